"""The comparison's numbers from its runs: each method's out-of-fold predictions pooled (AUC with DeLong's interval,
sensitivity / specificity at the validation thresholds with bootstrap intervals, calibration, localisation), the
paired DeLong differences to the reference method, the gamma curve, and the tables written from them. Used by
:mod:`cutremain_monai.experiments.compare` (which runs the folds) and :mod:`~cutremain_monai.experiments.compare_report`
(which draws them)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

import numpy as np

from cutremain_monai.metrics.classification import auc_or_nan
from cutremain_monai.metrics.comparison import (bootstrap_mean_ci, calibration, delong_ci, delong_paired, operating_point,
                                                t_mean_ci)

__all__ = ["pool_runs", "summarise_compare", "flat_maps_cell", "auc_mean_sd_cell", "ci_cell", "write_tables"]


def pool_runs(fold_runs: dict) -> dict:
    """One method's runs pooled over folds: file names (``fold:file``), probabilities, labels and each fold's 0/1
    prediction at that fold's own validation threshold."""
    files, prob, label, pred = [], [], [], []
    for k in sorted(fold_runs):
        r = fold_runs[k]
        files += [f"{k}:{f}" for f in r["files"]]
        prob += r["prob"]
        label += r["label"]
        pred += [int(p >= r["threshold"]) for p in r["prob"]]
    return {"files": files, "prob": np.asarray(prob), "label": np.asarray(label, dtype=int), "pred": np.asarray(pred)}


def summarise_compare(runs: dict, methods: Sequence[str], gamma_alias: dict | None = None,
                      gamma_folds: Sequence[int] | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """The per-method table, the paired differences to ``methods[0]`` and the gamma curve from the runs'
    per-image predictions (``runs[name][fold] = {"files", "prob", "label", "threshold", "localization"}``);
    ``gamma_alias``: ``{gamma: run name}``, pooled over ``gamma_folds`` (the same images at every gamma)."""
    def pooled_auc(pool):
        if len(np.unique(pool["label"])) < 2:
            return float("nan"), float("nan"), float("nan")
        return delong_ci(pool["label"], pool["prob"])

    table, paired = [], []
    pools = {m: pool_runs(runs[m]) for m in methods}
    ref = methods[0]
    for m in methods:
        pool = pools[m]
        fold_auc = [auc_or_nan(runs[m][k]["label"], runs[m][k]["prob"]) for k in sorted(runs[m])]
        fa = np.asarray([a for a in fold_auc if np.isfinite(a)])
        auc, low, high = pooled_auc(pool)
        y, pred = pool["label"], pool["pred"]
        sens = bootstrap_mean_ci(pred[y == 1], n_boot, seed=seed)
        spec = bootstrap_mean_ci(1 - pred[y == 0], n_boot, seed=seed)
        cal = calibration(y, pool["prob"])
        loc = {}
        for key in ("energy_in_box", "pointing_hit", "loc_hit", "flat"):
            vals = [v.get(key, float("nan")) for k in sorted(runs[m]) for v in runs[m][k]["localization"].values()]
            loc[key] = bootstrap_mean_ci(vals, n_boot, seed=seed) + (len(vals),)
        table.append({"method": m, "fold_auc": fold_auc, "auc_mean": float(fa.mean()) if len(fa) else float("nan"),
                      "auc_sd": float(fa.std(ddof=1)) if len(fa) > 1 else float("nan"),
                      "pooled_auc": auc, "pooled_auc_low": low, "pooled_auc_high": high, "n": int(len(y)),
                      "positives": int(y.sum()), "sensitivity": sens, "specificity": spec,
                      "f1": operating_point(y, pred, 0.5)["f1"],  # pred is 0/1 at each fold's own threshold
                      "thresholds": [runs[m][k]["threshold"] for k in sorted(runs[m])], "brier": cal["brier"],
                      "reliability": cal, "localization": loc})
        if m != ref:
            common = sorted(set(pools[ref]["files"]) & set(pool["files"]))
            a = dict(zip(pool["files"], pool["prob"]))
            b = dict(zip(pools[ref]["files"], pools[ref]["prob"]))
            lab = dict(zip(pool["files"], pool["label"]))
            yy = np.asarray([lab[f] for f in common])
            if len(common) and len(np.unique(yy)) == 2:
                d = delong_paired(yy, [a[f] for f in common], [b[f] for f in common])
            else:
                d = {"difference": float("nan"), "low": float("nan"), "high": float("nan"), "p": float("nan")}
            paired.append({"method": m, "reference": ref, "n": len(common), **d, **_fold_differences(runs[m], runs[ref])})
    gamma = []
    for g, name in sorted((gamma_alias or {}).items()):
        sub = {k: runs[name][k] for k in (gamma_folds if gamma_folds is not None else sorted(runs.get(name, {})))
               if k in runs.get(name, {})}
        auc, low, high = pooled_auc(pool_runs(sub)) if sub else (float("nan"),) * 3
        gamma.append({"gamma": g, "run": name, "pooled_auc": auc, "low": low, "high": high, "folds": len(sub),
                      "n": int(sum(len(r["files"]) for r in sub.values()))})
    return {"table": table, "paired": paired, "gamma": gamma, "reference": ref}


def _fold_differences(runs_m: dict, runs_ref: dict) -> dict:
    """Per fold, the AUC of the method minus the reference's on that fold's common test images, and their mean
    with a Student's t interval over the folds: the fold-to-fold spread (each fold a separate training), which the
    pooled DeLong interval, a statement about the test images only, leaves out."""
    diffs = []
    for k in sorted(set(runs_m) & set(runs_ref)):
        a, b = runs_m[k], runs_ref[k]
        pb = dict(zip(b["files"], b["prob"]))
        common = [i for i, f in enumerate(a["files"]) if f in pb]
        y = [a["label"][i] for i in common]
        d = auc_or_nan(y, [a["prob"][i] for i in common]) - auc_or_nan(y, [pb[a["files"][i]] for i in common])
        if np.isfinite(d):
            diffs.append(float(d))
    mean, low, high = t_mean_ci(diffs) if diffs else (float("nan"),) * 3
    return {"fold_differences": diffs, "fold_mean": mean, "fold_low": low, "fold_high": high,
            "folds_gained": int(sum(d > 0 for d in diffs))}


def flat_maps_cell(loc: dict) -> str:
    """``k/n``: how many of the scored maps were constant (they point nowhere)."""
    share, n = loc["flat"][0], loc["flat"][3]
    return "n/a" if not n or not np.isfinite(share) else f"{int(round(share * n))}/{n}"


def auc_mean_sd_cell(r: dict) -> str:
    """Per-fold AUC as ``mean ± sd``, or ``mean (1 fold)``."""
    n = sum(np.isfinite(a) for a in r["fold_auc"])
    return f"{r['auc_mean']:.3f} ± {r['auc_sd']:.3f}" if n > 1 else f"{r['auc_mean']:.3f} (1 fold)"


def ci_cell(v, low, high) -> str:
    """``v [low, high]`` to three decimals, ``v`` alone where there is no interval (one seed), ``n/a`` for a
    missing value."""
    if not np.isfinite(v):
        return "n/a"
    return f"{v:.3f}" if not (np.isfinite(low) and np.isfinite(high)) else f"{v:.3f} [{low:.3f}, {high:.3f}]"


def write_tables(summary: dict, output_dir: str) -> None:
    """``compare_table.md``, ``compare_summary.json`` and ``compare_results.csv`` of a summary."""
    lines = ["| method | AUC per fold (mean ± sd) | pooled AUC [95% CI, DeLong] | sensitivity [95% CI] | specificity [95% CI] "
             "| F1 | Brier | energy in box | pointing game | Loc. Acc. | flat maps | images (fractured) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["table"]:
        loc = r["localization"]
        lines.append(f"| {r['method']} | {auc_mean_sd_cell(r)} | "
                     f"{ci_cell(r['pooled_auc'], r['pooled_auc_low'], r['pooled_auc_high'])} | {ci_cell(*r['sensitivity'])} | "
                     f"{ci_cell(*r['specificity'])} | {r['f1']:.3f} | {r['brier']:.3f} | {ci_cell(*loc['energy_in_box'][:3])} | "
                     f"{ci_cell(*loc['pointing_hit'][:3])} | {ci_cell(*loc['loc_hit'][:3])} | {flat_maps_cell(loc)} | {r['n']} ({r['positives']}) |")
    paired = ["| method | vs | AUC difference [95% CI] | p (DeLong, paired) | images | per fold: mean [95% t-CI] "
              "| per fold | folds with a gain |", "|---|---|---|---|---|---|---|---|"]
    for d in summary["paired"]:
        folds = d["fold_differences"]
        paired.append(f"| {d['method']} | {d['reference']} | {ci_cell(d['difference'], d['low'], d['high'])} | "
                      f"{d['p']:.3f} | {d['n']} | {ci_cell(d['fold_mean'], d['fold_low'], d['fold_high'])} | "
                      f"{', '.join(f'{x:+.3f}' for x in folds) or 'n/a'} | {d['folds_gained']}/{len(folds)} |")
    gamma = ["| gamma | run | pooled AUC [95% CI] | folds |", "|---|---|---|---|"]
    gamma += [f"| {g['gamma']:.2f} | {g['run']} | {ci_cell(g['pooled_auc'], g['low'], g['high'])} | {g['folds']} |" for g in summary["gamma"]]
    with open(os.path.join(output_dir, "compare_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n\n" + "\n".join(paired) + "\n")
        if summary["gamma"]:
            f.write("\n" + "\n".join(gamma) + "\n")
    with open(os.path.join(output_dir, "compare_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    with open(os.path.join(output_dir, "compare_results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "fold", "auc", "threshold"])
        for r in summary["table"]:
            for k, (a, t) in enumerate(zip(r["fold_auc"], r["thresholds"])):
                w.writerow([r["method"], k, a, t])
