"""COVID severity metrics (the seed paper's evaluation): global-score MSE, MAE, Pearson correlation and R², and the
mean AUC over the six Brixia zones; and the same figures between two raters, so the model is read against human
disagreement.

Global score = the sum of the six binarised zone labels (0-6). The model's global score is the sum of its six zone
probabilities (the expected number of affected zones); a second rater's is the sum of their binarised zones.
Pearson and R² come from SciPy / scikit-learn (the reference implementations); what this adds is the Brixia
layout and the rater comparison on the same images.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score, roc_auc_score

from cutremain_monai.constants import BRIXIA_ZONES

__all__ = ["severity_metrics", "rater_agreement", "severity_table", "beats_baselines"]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    from scipy.stats import pearsonr

    return float(pearsonr(a, b)[0])


def severity_metrics(y_zones, p_zones) -> dict:
    """``y_zones``: ``(N, 6)`` zone labels of the reference (binarised here: score > 0); ``p_zones``: ``(N, 6)`` zone probabilities
    (or a second rater's 0/1 zones)."""
    y = (np.asarray(y_zones, dtype=np.float64).reshape(-1, 6) > 0).astype(np.float64)  # raw 0-3 scores -> 0/1
    p = np.asarray(p_zones, dtype=np.float64).reshape(-1, 6)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} differ")
    gy, gp = y.sum(1), p.sum(1)
    per_zone = {}
    for k, z in enumerate(BRIXIA_ZONES):
        yk = y[:, k] > 0.5
        per_zone[z] = float(roc_auc_score(yk, p[:, k])) if 0 < yk.sum() < len(yk) else float("nan")
    aucs = np.asarray(list(per_zone.values()))
    return {
        "mse": float(mean_squared_error(gy, gp)),
        "mae": float(mean_absolute_error(gy, gp)),
        "pearson": _pearson(gy, gp),
        "r2": float(r2_score(gy, gp)) if len(gy) > 1 else float("nan"),
        "mean_zone_auc": float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan"),
        "zone_auc": per_zone,
        "n": int(len(y)),
    }


def rater_agreement(items: list[dict], reference_key: str = "zone_scores", other_key: str = "zone_scores_other") -> dict | None:
    """:func:`severity_metrics` of the second rater against the reference rater on ``items`` that have both."""
    both = [it for it in items if it.get(reference_key) is not None and it.get(other_key) is not None]
    if not both:
        return None
    return severity_metrics([it[reference_key] for it in both], [it[other_key] for it in both])


def severity_table(model: dict | None, raters: dict | None, model_name: str = "model", rater_name: str = "rater J vs rater S",
                   baselines: dict | None = None) -> str:
    """Markdown table: the model, the baselines (``{name: metrics}``) and the second rater, each against the
    reference rater; with baselines, a last line says whether the model beats every one of them on MSE (lower)
    and on Pearson (higher)."""
    lines = ["| | n | MSE | MAE | Pearson | R² | mean zone AUC |", "|---|---|---|---|---|---|---|"]
    rows = [(model_name, model)] + [(f"baseline: {k}", v) for k, v in (baselines or {}).items()] + [(rater_name, raters)]
    for name, m in rows:
        if m:
            lines.append(f"| {name} | {m['n']} | {m['mse']:.3f} | {m['mae']:.3f} | {m['pearson']:.3f} | {m['r2']:.3f} | {m['mean_zone_auc']:.3f} |")
    out = "\n".join(lines) + "\n"
    if baselines and model:
        verdict = beats_baselines(model, baselines)
        out += ("\nThe model beats every baseline on MSE and Pearson.\n" if verdict["all"] else
                "\nThe model does NOT beat every baseline: " + "; ".join(
                    f"{k}: MSE {'better' if v['mse'] else 'not better'}, Pearson {'better' if v['pearson'] else 'not better'}"
                    for k, v in verdict["per_baseline"].items()) + ".\n")
    return out


def beats_baselines(model: dict, baselines: dict) -> dict:
    """Per baseline: does the model have a lower global-score MSE and a higher Pearson correlation (NaN: no)."""
    per = {}
    for k, b in baselines.items():
        per[k] = {"mse": bool(model["mse"] < b["mse"]),
                  "pearson": bool(np.isfinite(model["pearson"]) and (not np.isfinite(b["pearson"]) or model["pearson"] > b["pearson"]))}
    return {"per_baseline": per, "all": all(v["mse"] and v["pearson"] for v in per.values())}
