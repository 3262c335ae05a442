"""The comparison's ``report.html``: one self-contained page (figures embedded as PNG data URIs, no script, no
external file) with the settings, the method table with confidence intervals, the paired differences, the ROC
curves of every method on one plot, the reliability curves, the annotation-budget curve, and a grid of the same test
images with each method's heatmap and the ground-truth box. The figures are also written beside it as PNG files
(MLflow logs them). Matplotlib draws; this module lays out what a reader needs to judge the methods.
"""

from __future__ import annotations

import base64
import html
import os

import numpy as np

from cutremain_monai.experiments.compare_summary import auc_mean_sd_cell, ci_cell, flat_maps_cell, pool_runs
from cutremain_monai.localization.normalise import normalise_map

__all__ = ["write_report"]

_CSS = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #bbb;padding:4px 8px;font-size:13px;text-align:right}
th{background:#eef}td:first-child,th:first-child{text-align:left}img{max-width:100%}.note{color:#555;font-size:13px}"""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: str, xlabel: str, ylabel: str, title: str, legend_loc: str) -> None:
    """The y = x diagonal, labels and legend of the ROC and reliability plots; saved and closed."""
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)


def _roc(summary: dict, runs: dict, path: str) -> None:
    from sklearn.metrics import roc_curve

    fig, ax = _plt().subplots(figsize=(5.5, 5), dpi=100)
    for r in summary["table"]:
        pool = pool_runs(runs[r["method"]])
        if len(np.unique(pool["label"])) == 2:
            fpr, tpr, _ = roc_curve(pool["label"], pool["prob"])
            ax.plot(fpr, tpr, lw=1.5, label=f"{r['method']} {r['pooled_auc']:.3f}")
    _finish(fig, ax, path, "1 - specificity", "sensitivity", "ROC, pooled out-of-fold", "lower right")


def _reliability(summary: dict, path: str) -> None:
    fig, ax = _plt().subplots(figsize=(5.5, 5), dpi=100)
    for r in summary["table"]:
        c = r["reliability"]
        ax.plot(c["mean_predicted"], c["fraction_positive"], "o-", ms=3, lw=1, label=f"{r['method']} Brier {r['brier']:.3f}")
    _finish(fig, ax, path, "mean predicted probability", "fraction positive", "reliability (10 bins)", "upper left")


def _gamma(summary: dict, path: str) -> None:
    plt = _plt()
    g = summary["gamma"]
    x = np.asarray([r["gamma"] for r in g])
    y = np.asarray([r["pooled_auc"] for r in g])
    lo = np.asarray([r["low"] for r in g])
    hi = np.asarray([r["high"] for r in g])
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
    ax.errorbar(x, y, yerr=[np.nan_to_num(y - lo), np.nan_to_num(hi - y)], fmt="o-", capsize=3)
    ax.set_xlabel("gamma (share of training images whose boxes are used)")
    ax.set_ylabel("pooled AUC (95% CI, DeLong)")
    ax.set_xlim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("annotation budget: Cut&Remain")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _heat_grid(heat: dict, path: str) -> None:
    from matplotlib.patches import Rectangle

    plt = _plt()
    grid = heat["grid"]
    n_img = max(len(row) for _, row in grid)
    cols = 1 + len(grid)
    fig, axes = plt.subplots(n_img, cols, figsize=(2.2 * cols, 2.2 * n_img), dpi=90, squeeze=False)
    for i in range(n_img):
        for j in range(cols):
            ax = axes[i, j]
            ax.axis("off")
            if j == 0:
                case = grid[0][1][i] if i < len(grid[0][1]) else None
                title = "image + box" if i == 0 else ""
            else:
                method, row = grid[j - 1]
                case = row[i] if i < len(row) else None
                title = method
            if case is None:
                continue
            ax.imshow(case["image"], cmap="gray")
            if j > 0:
                ax.imshow(normalise_map(case["map"]), cmap="jet", alpha=0.45, vmin=0, vmax=1)
                title = f"{title}\np={case['prob']:.2f}"
            for b in case["boxes"].reshape(-1, 4):
                ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=1.2))
            ax.set_title(title, fontsize=8)
    fig.suptitle(f"{heat['method']} maps of the same test images (fold {heat['fold']}), green: ground-truth box", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _img(path: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img alt="{html.escape(os.path.basename(path))}" src="data:image/png;base64,{data}">'


def _ci(v) -> str:
    return ci_cell(*v[:3])


def _row(cells, header=False) -> str:
    tag = "th" if header else "td"
    return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"


def write_report(summary: dict, runs: dict, output_dir: str, heatmaps: dict | None = None) -> dict:
    """Write ``report.html`` and its figures into ``output_dir``; returns ``{"html": path, "figures": [paths]}``."""
    s = summary["settings"]
    figures = []
    roc = os.path.join(output_dir, "roc_curves.png")
    _roc(summary, runs, roc)
    rel = os.path.join(output_dir, "reliability.png")
    _reliability(summary, rel)
    figures += [roc, rel]
    gamma = None
    if summary["gamma"]:
        gamma = os.path.join(output_dir, "gamma_curve.png")
        _gamma(summary, gamma)
        figures.append(gamma)
    heat = None
    if heatmaps and heatmaps["grid"] and any(row for _, row in heatmaps["grid"]):
        heat = os.path.join(output_dir, "heatmaps.png")
        _heat_grid(heatmaps, heat)
        figures.append(heat)
    head = ["method", "AUC per fold, mean ± sd", "pooled AUC [95% CI]", "sensitivity [95% CI]", "specificity [95% CI]",
            "F1", "Brier", "energy in box", "pointing game", "Loc. Acc.", "flat maps", "images (positive)"]
    rows = [_row(head, header=True)]
    for r in summary["table"]:
        loc = r["localization"]
        rows.append(_row([r["method"], auc_mean_sd_cell(r),
                          _ci((r["pooled_auc"], r["pooled_auc_low"], r["pooled_auc_high"])), _ci(r["sensitivity"]),
                          _ci(r["specificity"]), f"{r['f1']:.3f}", f"{r['brier']:.3f}", _ci(loc["energy_in_box"]),
                          _ci(loc["pointing_hit"]), _ci(loc["loc_hit"]), flat_maps_cell(loc), f"{r['n']} ({r['positives']})"]))
    paired = [_row(["method", "reference", "AUC difference [95% CI]", "p (paired DeLong)", "images",
                    "per fold: mean [95% t-CI]", "folds with a gain"], header=True)]
    for d in summary["paired"]:
        paired.append(_row([d["method"], d["reference"], _ci((d["difference"], d["low"], d["high"])),
                            "n/a" if not np.isfinite(d["p"]) else f"{d['p']:.3f}", d["n"],
                            _ci((d["fold_mean"], d["fold_low"], d["fold_high"])),
                            f"{d['folds_gained']}/{len(d['fold_differences'])}"]))
    gamma_rows = [_row(["gamma", "run", "pooled AUC [95% CI]", "folds", "images"], header=True)]
    gamma_rows += [_row([f"{g['gamma']:.2f}", g["run"], _ci((g["pooled_auc"], g["low"], g["high"])), g["folds"], g["n"]])
                   for g in summary["gamma"]]
    loc_n = {r["method"]: r["localization"]["energy_in_box"][3] for r in summary["table"]}
    settings = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in s.items())
    body = [f"<h1>{html.escape(s['bundle'])}: comparison of {len(s['methods'])} methods</h1>",
            f"<p class=note>{s['images']} images, {s['folds']} folds grouped by <code>group</code> "
            f"({s['folds_run']} run); validation carved out of each training fold ({s['val_fraction']:.0%} of its groups) "
            f"chose the checkpoint and the threshold ({html.escape(s['threshold_rule'])}); each held-out fold used once. "
            f"Pooled AUC: every image's out-of-fold probability, with DeLong's 95% interval; sensitivity, specificity and "
            f"localisation: percentile bootstrap over images ({s.get('n_boot', 2000):,} resamples). Localisation: {html.escape(s['localization_method'])} "
            f"maps of the fractured test images with boxes ({', '.join(f'{k}: {v}' for k, v in loc_n.items())}); Loc. Acc. at the "
            f"threshold chosen on validation. A flat (constant) map points nowhere and counts as a pointing-game miss.</p>",
            "<h2>Methods</h2><table>" + "".join(rows) + "</table>",
            f"<h2>Paired differences to {html.escape(summary['reference'])}</h2><table>" + "".join(paired) + "</table>",
            "<h2>ROC curves and calibration</h2>", _img(roc), _img(rel)]
    if gamma:
        body += [f"<h2>Annotation budget</h2><p class=note>Cut&amp;Remain with boxes on a share gamma of the training "
                 f"images, on the first {s['gamma_folds']} folds; gamma 0 uses no box (the none run).</p>",
                 "<table>" + "".join(gamma_rows) + "</table>", _img(gamma)]
    if heat:
        body += ["<h2>Where each method looks</h2>", _img(heat)]
    body += ["<h2>Settings</h2><ul>" + settings + "</ul>"]
    page = ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>comparison report</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")
    path = os.path.join(output_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return {"html": path, "figures": figures}
