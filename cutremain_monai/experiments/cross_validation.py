"""Experiment runners over a bundle: k-fold cross-validation per augmentation (the paper's Table 2), and runs of
one bundle with overrides (train -> evaluate on a held-out section), used by ``cutremain experiment`` and the demo.

Folds are by ``group`` (patient), never split across train and held-out; inside each training fold a group-wise
validation share is set apart to choose the checkpoint and the F1 threshold, so the held-out fold is used once,
for the reported numbers only.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from cutremain_monai.engines.bundle import run_bundle, with_study_store
from cutremain_monai.handlers.mlflow_registry import default_tracking_uri
from cutremain_monai.io.datalist import kfold_by_group, split_by_group

__all__ = ["train_and_test", "cross_validate", "summarise", "per_class_table",
           "gamma_curve"]

logger = logging.getLogger(__name__)


def train_and_test(bundle: str, datalist: str, output_dir: str, extra_configs: Sequence[str] = ("cpu.yaml",),
                   task: str | None = None, **overrides) -> dict:
    """Train (with validation) then evaluate on the datalist's ``test`` section; returns the test metrics plus the
    Grad-CAM energy-in-box of the best checkpoint on validation images."""
    common = dict(datalist=datalist, datalist_task=task, output_dir=output_dir, **overrides)
    run_bundle(bundle, ["train.yaml", *extra_configs], **common)
    run_bundle(bundle, ["train.yaml", *extra_configs, "evaluate.yaml"], **common)
    with open(os.path.join(output_dir, "test_metrics.json")) as f:
        result = json.load(f)
    cam = os.path.join(output_dir, "cam_report.json")
    if os.path.exists(cam):
        with open(cam) as f:
            result["cam_energy_in_box"] = json.load(f)["cam_energy_in_box"]
    return result


def cross_validate(bundle: str, items: list[dict], output_dir: str, augmentations: Sequence[str], folds: int = 5,
                   seed: int = 0, val_fraction: float = 0.2, extra_configs: Sequence[str] = ("cpu.yaml",),
                   tracking: bool = True, **overrides) -> list[dict]:
    """k-fold CV of every augmentation on the same folds; writes ``cv_results.csv`` and ``cv_table.{md,csv}``."""
    os.makedirs(output_dir, exist_ok=True)
    rows = []
    for k, (train_items, test_items) in enumerate(kfold_by_group(items, folds, seed)):
        inner = split_by_group(train_items, (1 - val_fraction, val_fraction, 0.0), seed + k)
        dl_path = os.path.join(output_dir, f"fold{k}_datalist.json")
        with open(dl_path, "w") as f:
            json.dump({"training": inner["training"], "validation": inner["validation"] + inner["test"], "test": test_items}, f)
        for aug in augmentations:
            out = os.path.join(output_dir, f"fold{k}", aug)
            logger.info("fold %d/%d, augmentation %s", k + 1, folds, aug)
            m = train_and_test(bundle, dl_path, out, extra_configs, augmentation=aug, seed=seed,
                               register_model=False, experiment_name=f"cv_{os.path.basename(os.path.normpath(bundle))}",
                               run_name=f"fold{k}_{aug}", **with_study_store(output_dir, overrides))
            rows.append({"fold": k, "augmentation": aug, **{key: m.get(key) for key in _ROW_KEYS}, "per_class": m.get("per_class")})
            with open(os.path.join(output_dir, "cv_results.csv"), "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["fold", "augmentation", *_ROW_KEYS], extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
    table = summarise(rows, augmentations)
    with open(os.path.join(output_dir, "cv_table.md"), "w") as f:
        f.write(table["markdown"])
    with open(os.path.join(output_dir, "cv_table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["augmentation", "auc_mean", "auc_std", "f1_mean", "f1_std", "accuracy_mean", "accuracy_std", "cam_energy_in_box_mean", "folds"])
        w.writerows(table["rows"])
    if any(r.get("per_class") for r in rows):
        with open(os.path.join(output_dir, "cv_per_class.md"), "w") as f:
            f.write(per_class_table(rows, augmentations))
    if tracking:
        _log_table(output_dir, bundle, table)
    return rows


_ROW_KEYS = ("auc", "f1", "accuracy", "threshold", "map", "cf1", "of1", "n", "positives", "cam_energy_in_box")


def per_class_table(rows: list[dict], augmentations: Sequence[str], metrics: Sequence[str] = ("auc", "f1")) -> str:
    """Per-class metrics (mean over folds, NaN folds left out) in the layout of the paper's Table 3: one row per
    augmentation, one column per class and metric."""
    names = next(list(r["per_class"]) for r in rows if r.get("per_class"))
    head = [f"{n} {m.upper()}" for n in names for m in metrics]
    lines = ["| augmentation | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for aug in augmentations:
        cells = []
        for n in names:
            for m in metrics:
                v = np.asarray([float(r["per_class"][n].get(m, np.nan)) for r in rows if r["augmentation"] == aug and r.get("per_class")])
                v = v[np.isfinite(v)]
                cells.append(f"{v.mean():.3f}" if len(v) else "n/a")
        lines.append(f"| {aug} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gamma_curve(bundle: str, datalist: str, output_dir: str, gammas: Sequence[float], task: str | None = None,
                extra_configs: Sequence[str] = ("cpu.yaml",), metric: str = "auc", seed: int = 0, tracking: bool = True,
                **overrides) -> list[dict]:
    """The annotation-budget curve (the paper's Figure 7): train Cut&Remain at each ``gamma`` (the fraction of
    training images whose boxes are used; 0 = no box used, the baseline) on the datalist's training section, choose
    the checkpoint on validation, report on test. Writes ``gamma_results.csv``, ``gamma_table.md`` and
    ``gamma_curve.png`` (``metric`` against gamma) and logs them to MLflow. Samples chosen at a smaller gamma stay
    chosen at a larger one (``CutRemaind``'s seeded choice is nested), so the curve measures added annotation."""
    os.makedirs(output_dir, exist_ok=True)
    rows = []
    for g in gammas:
        if not 0.0 <= float(g) <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {g}")
        out = os.path.join(output_dir, f"gamma_{float(g):.2f}")
        logger.info("gamma %.2f", g)
        m = train_and_test(bundle, datalist, out, extra_configs, task=task, augmentation="cut_remain", gamma=float(g),
                           seed=seed, register_model=False, run_name=f"gamma_{float(g):.2f}",
                           experiment_name=f"gamma_{os.path.basename(os.path.normpath(bundle))}",
                           **with_study_store(output_dir, overrides))
        rows.append({"gamma": float(g), **{k: m.get(k) for k in _ROW_KEYS if m.get(k) is not None}})
    keys = ["gamma"] + [k for k in _ROW_KEYS if any(k in r for r in rows)]
    with open(os.path.join(output_dir, "gamma_results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(rows)
    shown = [k for k in ("auc", "f1", "accuracy", "map", "of1", "cam_energy_in_box") if k in keys]
    lines = ["| gamma | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    lines += ["| " + f"{r['gamma']:.2f} | " + " | ".join(f"{float(r[k]):.3f}" if r.get(k) is not None else "n/a" for k in shown) + " |" for r in rows]
    with open(os.path.join(output_dir, "gamma_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot_gamma(rows, metric, os.path.join(output_dir, "gamma_curve.png"), os.path.basename(os.path.normpath(bundle)))
    if tracking:
        import mlflow


        mlflow.set_tracking_uri(default_tracking_uri(output_dir))
        mlflow.set_experiment(f"gamma_{os.path.basename(os.path.normpath(bundle))}")
        with mlflow.start_run(run_name="gamma_curve"):
            mlflow.log_param("gammas", ",".join(f"{r['gamma']:.2f}" for r in rows))
            for i, r in enumerate(rows):
                mlflow.log_metrics({f"test_{k}": float(r[k]) for k in shown if r.get(k) is not None and np.isfinite(float(r[k]))}, step=i)
            for name in ("gamma_results.csv", "gamma_table.md", "gamma_curve.png"):
                mlflow.log_artifact(os.path.join(output_dir, name))
    return rows


def _plot_gamma(rows: list[dict], metric: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["gamma"] for r in rows]
    v = [float(r.get(metric, np.nan)) if r.get(metric) is not None else np.nan for r in rows]
    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
    ax.plot(g, v, "o-")
    ax.set_xlabel("gamma (fraction of training images with boxes used)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{title}: annotation budget")
    ax.set_xlim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summarise(rows: list[dict], augmentations: Sequence[str]) -> dict:
    """Mean ± std (sample std, ddof=1) per augmentation, as markdown and rows."""
    lines = ["| augmentation | AUC-ROC | F1 | accuracy | CAM energy in box | folds |", "|---|---|---|---|---|---|"]
    out_rows = []
    for aug in augmentations:
        r = [x for x in rows if x["augmentation"] == aug]
        def ms(key):
            v = np.asarray([float(x[key]) for x in r if x.get(key) is not None], dtype=np.float64)
            v = v[np.isfinite(v)]
            if len(v) == 0:
                return float("nan"), float("nan")
            return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        (am, asd), (fm, fsd), (cm, csd), (em, _) = ms("auc"), ms("f1"), ms("accuracy"), ms("cam_energy_in_box")
        lines.append(f"| {aug} | {am:.3f} ± {asd:.3f} | {fm:.3f} ± {fsd:.3f} | {cm:.3f} ± {csd:.3f} | {em:.3f} | {len(r)} |")
        out_rows.append([aug, am, asd, fm, fsd, cm, csd, em, len(r)])
    return {"markdown": "\n".join(lines) + "\n", "rows": out_rows}


def _log_table(output_dir: str, bundle: str, table: dict) -> None:
    import mlflow


    mlflow.set_tracking_uri(default_tracking_uri(output_dir))
    mlflow.set_experiment(f"cv_{os.path.basename(os.path.normpath(bundle))}")
    with mlflow.start_run(run_name="cv_summary"):
        for aug, am, asd, fm, fsd, cm, csd, em, n in table["rows"]:
            mlflow.log_metrics({f"{aug}_auc_mean": am, f"{aug}_auc_std": asd, f"{aug}_f1_mean": fm, f"{aug}_accuracy_mean": cm})
        for name in ("cv_table.md", "cv_table.csv", "cv_results.csv"):
            mlflow.log_artifact(os.path.join(output_dir, name))
