"""Classification metrics: binary AUC / F1 / accuracy with a validation-chosen threshold, and the multi-label
mAP / CF1 / OF1 of ChestX-ray14 papers. Thin layer over scikit-learn (the reference implementation); what it adds
is the threshold protocol (chosen on validation, applied unchanged to test) and per-class reporting."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

__all__ = ["THRESHOLD_RULES", "auc_or_nan", "auc_ci", "best_f1_threshold", "choose_threshold", "binary_metrics", "multiclass_metrics", "multilabel_metrics", "mean_auc", "roc_points"]


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


THRESHOLD_RULES = ("f1", "youden", "sensitivity")


def choose_threshold(y_true, y_score, rule: str = "f1", target_sensitivity: float = 0.9) -> float:
    """The operating threshold chosen on these (validation) labels by ``rule``:
    - ``f1``: best F1 (:func:`best_f1_threshold`). F1 counts true negatives nowhere, so the threshold moves with
      the share of positives: chosen where half the images are positive, it flags too many where few are.
    - ``youden``: the score that maximises Youden's J = sensitivity + specificity - 1 (ties: the higher score).
      Sensitivity and specificity are rates within each class, so J does not depend on the share of positives.
    - ``sensitivity``: the highest score whose sensitivity is at least ``target_sensitivity`` (a screening
      operating point; also prevalence-free).

    One class only: 0.5 for ``youden`` and ``sensitivity`` (``f1``: :func:`best_f1_threshold`'s rule)."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, got {rule!r}")
    y = np.asarray(y_true).reshape(-1).astype(int)
    p = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if rule == "f1":
        return best_f1_threshold(y, p)
    if y.min() == y.max():
        return 0.5
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    keep = np.isfinite(thr)  # the first point is "above every score"
    fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    if rule == "youden":
        return float(thr[int(np.argmax(tpr - fpr))])  # thresholds fall: argmax's first hit is the higher score
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    return float(thr[int(np.argmax(tpr >= target_sensitivity - 1e-12))])


def binary_metrics(y_true, y_score, threshold: float | None = None, rule: str = "f1",
                   target_sensitivity: float = 0.9) -> dict:
    """AUC-ROC, F1, accuracy, sensitivity and specificity; the threshold is chosen by :func:`choose_threshold`
    (``rule``) when not given."""
    y_true = np.asarray(y_true).reshape(-1).astype(int)
    y_score = np.asarray(y_score, dtype=np.float64).reshape(-1)
    t = choose_threshold(y_true, y_score, rule, target_sensitivity) if threshold is None else float(threshold)
    pred = (y_score >= t).astype(int)
    both = len(np.unique(y_true)) == 2
    return {
        "auc": float(roc_auc_score(y_true, y_score)) if both else float("nan"),
        "f1": float(f1_score(y_true, pred, zero_division=0)),
        "accuracy": float(accuracy_score(y_true, pred)),
        "sensitivity": float(pred[y_true == 1].mean()) if y_true.any() else float("nan"),
        "specificity": float(1 - pred[y_true == 0].mean()) if (y_true == 0).any() else float("nan"),
        "threshold": t,
        "n": int(len(y_true)),
        "positives": int(y_true.sum()),
    }


def roc_points(y_true, y_score):
    fpr, tpr, _ = roc_curve(np.asarray(y_true).reshape(-1).astype(int), np.asarray(y_score).reshape(-1))
    return fpr, tpr


def auc_or_nan(y, p) -> float:
    """ROC AUC of binary labels ``y`` and scores ``p``; NaN when ``y`` holds one class only."""
    y = np.asarray(y).astype(int)
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def auc_ci(y_true, y_score, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """``(AUC, low, high)``: the ROC AUC with a percentile bootstrap interval (images resampled with replacement,
    ``n_boot`` times; resamples with one class only are drawn again). NaN when ``y_true`` has one class."""
    y = np.asarray(y_true).reshape(-1).astype(int)
    p = np.asarray(y_score, dtype=np.float64).reshape(-1)
    auc = auc_or_nan(y, p)
    if not np.isfinite(auc):
        return auc, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    while len(values) < n_boot:
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            values.append(roc_auc_score(y[idx], p[idx]))
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return auc, float(low), float(high)


def _nanmean(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def mean_auc(y_true, y_score) -> float:
    """Mean one-vs-rest AUC over the columns of ``(N, K)`` targets that hold both classes (a column with only
    negatives, common for rare findings in a small validation set, is left out instead of making the mean NaN)."""
    y = np.asarray(y_true).reshape(len(y_true), -1)
    p = np.asarray(y_score, dtype=np.float64).reshape(len(y_score), -1)
    return _nanmean([auc_or_nan(y[:, k], p[:, k]) for k in range(y.shape[1])])


def multiclass_metrics(y_true, y_prob, class_names=None) -> dict:
    """Single-label K-class metrics in the layout of the Cut&Remain paper's Table 3: per-class one-vs-rest AUC-ROC
    and F1 (prediction = arg max of the probabilities), their macro means and the accuracy.

    ``y_true``: ``(N,)`` class indices or ``(N, K)`` one-hot; ``y_prob``: ``(N, K)`` probabilities.
    """
    p = np.asarray(y_prob, dtype=np.float64)
    k = p.shape[1]
    y = np.asarray(y_true)
    y = y.reshape(len(y), -1).argmax(1) if y.ndim == 2 and y.shape[1] == k and k > 1 else y.reshape(-1).astype(int)
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    pred = p.argmax(1)
    f1s = f1_score(y, pred, labels=list(range(k)), average=None, zero_division=0)
    per_class = {n: {"auc": auc_or_nan(y == c, p[:, c]), "f1": float(f1s[c]), "support": int((y == c).sum())}
                 for c, n in enumerate(names)}
    return {
        "auc": _nanmean([v["auc"] for v in per_class.values()]),
        "f1": float(np.mean(f1s)),
        "accuracy": float(accuracy_score(y, pred)),
        "n": int(len(y)),
        "per_class": per_class,
    }


def multilabel_metrics(y_true, y_prob, class_names=None, thresholds=None, rule: str = "f1",
                       target_sensitivity: float = 0.9) -> dict:
    """Multi-label metrics of ChestX-ray14 papers (the Cut&Remain paper's Tables 4 and 5).

    Per class: AUC-ROC, average precision and F1 at that class's threshold. Summary: mean AUC (over classes with
    both labels present), mAP (mean AP over classes with a positive), CF1 = 2 CP CR / (CP + CR) from the per-class
    mean precision CP and recall CR, and OF1 from the overall (micro) precision and recall, the definitions of
    Chen et al. (ML-GCN) that Table 5 uses. ``thresholds``: one per class, or None to choose each on these labels
    by ``rule`` (:func:`choose_threshold`; validation; pass the saved ones on test). ``accuracy`` is the exact-match (subset) accuracy.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"labels {y.shape} and probabilities {p.shape} must both be (N, K)")
    k = y.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    if thresholds is None:
        thresholds = [choose_threshold(y[:, c], p[:, c], rule, target_sensitivity) for c in range(k)]
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if len(t) != k:
        raise ValueError(f"{len(t)} thresholds for {k} classes")
    pred = (p >= t[None]).astype(int)
    cp = precision_score(y, pred, average="macro", zero_division=0)
    cr = recall_score(y, pred, average="macro", zero_division=0)
    per_class = {}
    for c, n in enumerate(names):
        per_class[n] = {"auc": auc_or_nan(y[:, c], p[:, c]),
                        "ap": float(average_precision_score(y[:, c], p[:, c])) if y[:, c].any() else float("nan"),
                        "f1": float(f1_score(y[:, c], pred[:, c], zero_division=0)), "threshold": float(t[c]),
                        "positives": int(y[:, c].sum())}
    return {
        "auc": _nanmean([v["auc"] for v in per_class.values()]),
        "map": _nanmean([v["ap"] for v in per_class.values()]),
        "cf1": float(2 * cp * cr / (cp + cr)) if cp + cr > 0 else 0.0,
        "of1": float(f1_score(y, pred, average="micro", zero_division=0)),
        "f1": float(2 * cp * cr / (cp + cr)) if cp + cr > 0 else 0.0,  # = CF1, the class-averaged F1
        "accuracy": float(accuracy_score(y, pred)),
        "thresholds": [float(v) for v in t],
        "n": int(len(y)),
        "per_class": per_class,
    }
