"""Statistics for comparing classifiers on the same images: DeLong's AUC variance, confidence interval and paired
test, a percentile bootstrap of a mean, the operating point at a threshold and calibration.

scikit-learn gives the AUC, the Brier score and the reliability bins; it has no variance of an AUC and no test of
two correlated AUCs. This module adds DeLong, DeLong & Clarke-Pearson (1988) in the fast midrank form of Sun & Xu
(2014): for scores of positives ``X_i`` (m) and negatives ``Y_j`` (n) and ``psi(x, y) = 1 [x > y] + 0.5 [x = y]``,

    AUC = mean_ij psi(X_i, Y_j),  V10_i = mean_j psi(X_i, Y_j),  V01_j = mean_i psi(X_i, Y_j),
    Cov(AUC_a, AUC_b) = cov(V10_a, V10_b) / m + cov(V01_a, V01_b) / n   (sample covariances, ddof=1),

so two models scored on the same images get the variance of their difference ``S_aa + S_bb - 2 S_ab``, a normal
95% interval and a two-sided p-value. The same formulas are what pROC's ``roc.test(method="delong")`` computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import norm, rankdata
from scipy.stats import t as student_t

__all__ = ["delong_covariance", "delong_ci", "delong_paired", "bootstrap_mean_ci", "t_mean_ci", "operating_point",
           "calibration"]


def _split(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    s = s.reshape(1, -1) if s.ndim == 1 else s.reshape(len(s), -1)
    if s.shape[1] != len(y):
        raise ValueError(f"{s.shape[1]} scores for {len(y)} labels")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError(f"labels must be 0/1, got {sorted(set(np.unique(y)))}")
    if y.min() == y.max():
        raise ValueError("DeLong needs both classes among the labels")
    return s[:, y == 1], s[:, y == 0]


def delong_covariance(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """``scores``: ``(N,)`` or ``(K, N)`` for K models on the same N images -> (AUCs ``(K,)``, covariance ``(K, K)``)."""
    x, yneg = _split(y_true, scores)
    m, n = x.shape[1], yneg.shape[1]
    tx = np.stack([rankdata(r) for r in x])
    ty = np.stack([rankdata(r) for r in yneg])
    tz = np.stack([rankdata(r) for r in np.concatenate([x, yneg], axis=1)])
    auc = (tz[:, :m].sum(1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    if m < 2 or n < 2:  # one positive or one negative: no sample covariance, so no interval
        return auc, np.full((len(x), len(x)), np.nan)
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return auc, s10 / m + s01 / n


def delong_ci(y_true, score, alpha: float = 0.05) -> tuple[float, float, float]:
    """``(AUC, low, high)``: DeLong's normal interval, clipped to [0, 1] (NaN bounds with one positive or negative)."""
    auc, cov = delong_covariance(y_true, score)
    if not np.isfinite(cov[0, 0]):
        return float(auc[0]), float("nan"), float("nan")
    half = norm.ppf(1 - alpha / 2) * np.sqrt(max(cov[0, 0], 0.0))
    return float(auc[0]), float(max(0.0, auc[0] - half)), float(min(1.0, auc[0] + half))


def delong_paired(y_true, score_a, score_b, alpha: float = 0.05) -> dict:
    """AUC(a) - AUC(b) on the same images: ``{"auc_a", "auc_b", "difference", "low", "high", "z", "p"}``. Identical
    scores give difference 0 and p = 1."""
    auc, cov = delong_covariance(y_true, np.stack([np.asarray(score_a, float).reshape(-1), np.asarray(score_b, float).reshape(-1)]))
    diff = float(auc[0] - auc[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    sd = np.sqrt(max(var, 0.0)) if np.isfinite(var) else float("nan")
    half = norm.ppf(1 - alpha / 2) * sd
    if not np.isfinite(var):
        z, p = float("nan"), float("nan")
    elif sd <= 1e-12:  # no variance of the difference: equal scores (p 1) or a difference that cannot be chance
        z, p = (0.0, 1.0) if abs(diff) < 1e-12 else (float(np.copysign(np.inf, diff)), 0.0)
    else:
        z = diff / sd
        p = float(2 * norm.sf(abs(z)))
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "difference": diff, "low": diff - half, "high": diff + half,
            "z": float(z), "p": float(p)}


def t_mean_ci(values, alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean and Student's t interval over a few independent repeats (training seeds); NaN bounds with one value.

    What a seed changes (initial weights, order, augmentation draws) is the variation this interval covers; the
    images are the same in every repeat, so their sampling is not in it (DeLong's per-repeat interval is)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan"), float("nan")
    half = student_t.ppf(1 - alpha / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def bootstrap_mean_ci(values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Mean and its percentile-bootstrap interval over the items (NaNs left out); NaNs when nothing is left."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = rng.choice(v, size=(n_boot, len(v)), replace=True).mean(1)
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(low), float(high)


def operating_point(y_true, score, threshold: float) -> dict:
    """Sensitivity, specificity, PPV, F1 and accuracy of ``score >= threshold`` (NaN where a denominator is 0)."""
    y = np.asarray(y_true).reshape(-1).astype(int)
    pred = np.asarray(score, dtype=np.float64).reshape(-1) >= threshold
    tp, fn = int((pred & (y == 1)).sum()), int((~pred & (y == 1)).sum())
    tn, fp = int((~pred & (y == 0)).sum()), int((pred & (y == 0)).sum())

    def ratio(a, b):
        return a / b if b else float("nan")

    return {"threshold": float(threshold), "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "ppv": ratio(tp, tp + fp), "f1": ratio(2 * tp, 2 * tp + fp + fn), "accuracy": ratio(tp + tn, len(y)),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def calibration(y_true, prob, bins: int = 10) -> dict:
    """Brier score and the reliability curve (``bins`` equal-width bins of the predicted probability; empty bins
    left out; the bins of ``sklearn.calibration.calibration_curve``, with their counts, which it does not return):
    ``{"brier", "mean_predicted", "fraction_positive", "count"}``."""
    from sklearn.metrics import brier_score_loss

    y = np.asarray(y_true).reshape(-1).astype(int)
    p = np.clip(np.asarray(prob, dtype=np.float64).reshape(-1), 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.searchsorted(edges[1:-1], p)  # a probability on an edge goes to the lower bin, as scikit-learn's
    mean_p: Sequence[float] = []
    frac: Sequence[float] = []
    count: Sequence[int] = []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            mean_p.append(float(p[sel].mean()))
            frac.append(float(y[sel].mean()))
            count.append(int(sel.sum()))
    return {"brier": float(brier_score_loss(y, p)), "mean_predicted": list(mean_p), "fraction_positive": list(frac),
            "count": list(count)}
