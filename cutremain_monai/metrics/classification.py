"""Classification metrics: binary AUC / F1 / accuracy with a validation-chosen threshold, and the multi-label
mAP / CF1 / OF1 of ChestX-ray14 papers. Thin layer over scikit-learn (the reference implementation); what it adds
is the threshold protocol (chosen on validation, applied unchanged to test) and per-class reporting."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score, roc_curve

__all__ = ["best_f1_threshold", "binary_metrics"]


def best_f1_threshold(y_true, y_score) -> float:
    """The score threshold that maximises F1 on these (validation) labels; ties take the lowest threshold."""
    y_true = np.asarray(y_true).reshape(-1).astype(int)
    y_score = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if y_true.sum() == 0:
        return 0.5
    best_t, best_f1 = 0.5, -1.0
    for t in np.unique(y_score):
        f1 = f1_score(y_true, (y_score >= t).astype(int), zero_division=0)
        if f1 > best_f1:
            best_t, best_f1 = float(t), f1
    return best_t


def binary_metrics(y_true, y_score, threshold: float | None = None) -> dict:
    """AUC-ROC, F1 and accuracy; the threshold is chosen by :func:`best_f1_threshold` when not given."""
    y_true = np.asarray(y_true).reshape(-1).astype(int)
    y_score = np.asarray(y_score, dtype=np.float64).reshape(-1)
    t = best_f1_threshold(y_true, y_score) if threshold is None else float(threshold)
    pred = (y_score >= t).astype(int)
    both = len(np.unique(y_true)) == 2
    return {
        "auc": float(roc_auc_score(y_true, y_score)) if both else float("nan"),
        "f1": float(f1_score(y_true, pred, zero_division=0)),
        "accuracy": float(accuracy_score(y_true, pred)),
        "threshold": t,
        "n": int(len(y_true)),
        "positives": int(y_true.sum()),
    }


def roc_points(y_true, y_score):
    fpr, tpr, _ = roc_curve(np.asarray(y_true).reshape(-1).astype(int), np.asarray(y_score).reshape(-1))
    return fpr, tpr
