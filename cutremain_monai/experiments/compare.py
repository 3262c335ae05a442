"""``cutremain experiment compare``: every method (an augmentation, a guidance, or both) trained and tested on the same
grouped folds, pooled out-of-fold statistics with confidence intervals, paired differences to the baseline, the
annotation-budget curve, and one report to look at.

What it adds to :func:`~cutremain_monai.experiments.cross_validation.cross_validate` (mean +/- sd of per-fold numbers):

- **the same images for every method**: the folds are drawn once (by ``group``: patient, or blocks of image
  numbers merged by near-duplicates), saved in ``folds.json``, and a re-run over other data is refused;
- **pooled out-of-fold AUC** with DeLong's 95% interval, and the **paired** DeLong difference of every method to
  the baseline on the same images, with its interval and p-value (:mod:`cutremain_monai.metrics.comparison`);
- **an operating point that survives a change of prevalence**: each fold's threshold is chosen on that fold's
  validation share by ``threshold_rule`` (default Youden's J; or a target sensitivity), never on the held-out
  fold; sensitivity, specificity and F1 pooled over the folds, and calibration (Brier score, reliability curve);
- **localisation** of the test images with boxes (energy in box, pointing game, Loc. Acc. at the validation tau),
  pooled per image with bootstrap intervals;
- **the annotation-budget curve** (Cut&Remain at each gamma) on the same folds, with DeLong intervals; gamma 0
  uses no box at all, so it is the ``none`` run, and gamma 1 the ``cut_remain`` run, when those are compared;
- **resumable**: a finished fold x method leaves ``result.json`` and is not run again; a killed one continues
  from its last epoch checkpoint (the bundle's ``resume``);
- ``report.html`` (:mod:`cutremain_monai.experiments.compare_report`), logged to MLflow with its figures.

Validation is carved out of each training fold (``val_fraction`` of its groups); the held-out fold is used once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from cutremain_monai.data.preprocessed import CachedTransform
from cutremain_monai.data.resized_copies import resized_copies
from cutremain_monai.engines.bundle import bundle_parser, load_network, with_study_store
from cutremain_monai.engines.methods import method_overrides
from cutremain_monai.experiments.compare_report import write_report
from cutremain_monai.experiments.compare_summary import summarise_compare, write_tables
from cutremain_monai.experiments.cross_validation import train_and_test
from cutremain_monai.handlers.mlflow_registry import default_tracking_uri
from cutremain_monai.io.datalist import kfold_by_group, split_by_group
from cutremain_monai.localization.report import compute_map, scored_cases, upsample_map

__all__ = ["compare"]

logger = logging.getLogger(__name__)


def _gamma_name(g: float) -> str:
    return f"cut_remain@gamma{g:.2f}"


def _label(item: dict) -> int:
    v = item.get("label", 0)
    return int(np.max(np.asarray(v, dtype=float))) if np.size(v) else 0


def _key(item: dict) -> str:
    return str(item.get("image_id") or item["image"])


def _items_hash(items: Sequence[dict]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([_key(it), _label(it), it.get("group")]).encode())
    return h.hexdigest()[:16]


def _prepare_folds(items: list[dict], output_dir: str, folds: int, seed: int, val_fraction: float,
                   shrink: int | None = None) -> list[str]:
    """The fold datalists (written once, reused on resume); refuses an output folder made for other items."""
    meta_path = os.path.join(output_dir, "folds.json")
    digest = _items_hash(items)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if (meta["items_hash"] != digest or meta["folds"] != folds or meta["seed"] != seed
                or meta["val_fraction"] != val_fraction or meta.get("shrink") != shrink):
            raise ValueError(f"{meta_path}: this folder holds a comparison of other data or folds (items {meta['items_hash']}, "
                             f"{meta['folds']} folds, seed {meta['seed']}, shrink {meta.get('shrink')}); use a new output folder")
        return [os.path.join(output_dir, f"fold{k}_datalist.json") for k in range(folds)]
    paths, assignment = [], {}
    for k, (train_items, test_items) in enumerate(kfold_by_group(items, folds, seed)):
        inner = split_by_group(train_items, (1 - val_fraction, val_fraction, 0.0), seed + k)
        path = os.path.join(output_dir, f"fold{k}_datalist.json")
        with open(path, "w") as f:
            json.dump({"training": inner["training"], "validation": inner["validation"] + inner["test"], "test": test_items}, f)
        assignment.update({_key(it): k for it in test_items})
        paths.append(path)
    with open(meta_path, "w") as f:
        json.dump({"items_hash": digest, "folds": folds, "seed": seed, "val_fraction": val_fraction, "shrink": shrink,
                   "test_fold": assignment}, f)
    return paths


def _read_run(run_dir: str, fold_items: list[dict], loc_method: str) -> dict:
    """Per-image test probabilities, the fold's validation threshold and per-image localisation of one run."""
    labels = {_key(it): _label(it) for it in fold_items}
    probs: dict = {}
    with open(os.path.join(run_dir, "test_predictions.csv")) as f:
        for row in csv.DictReader(f):
            if not row.get("error") and row["file"] in labels:
                probs[row["file"]] = float(row["probability"])
    with open(os.path.join(run_dir, "threshold.json")) as f:
        threshold = float(json.load(f)["threshold"])
    loc: dict = {}
    loc_csv = os.path.join(run_dir, "test_localization.csv")
    if os.path.exists(loc_csv):
        with open(loc_csv) as f:
            for row in csv.DictReader(f):
                if row["method"] == loc_method:
                    # a constant map points nowhere: its tie "hit" is a miss here. Files from before the "flat" column:
                    # a CAM / Grad-CAM map (non-negative) with no energy at all (energy in box 0/0 = NaN) is all zero
                    flat = row["flat"] == "1" if row.get("flat") not in (None, "") else (
                        loc_method in ("cam", "gradcam", "gradcam_pp") and not np.isfinite(float(row["energy_in_box"])))
                    loc[row["image"]] = {"energy_in_box": float(row["energy_in_box"]),
                                         "pointing_hit": 0.0 if flat else float(row["pointing_hit"]),
                                         "loc_hit": float(row["loc_hit"]) if row.get("loc_hit") not in (None, "") else float("nan"),
                                         "flat": float(flat)}
    return {"files": sorted(probs), "prob": [probs[k] for k in sorted(probs)], "label": [labels[k] for k in sorted(probs)],
            "threshold": threshold, "localization": loc}


def _ordered_methods(methods: Sequence[str]) -> list[str]:
    """The methods without repeats, each checked; ``none`` (the reference of the paired differences) first."""
    methods = list(dict.fromkeys(methods))
    for m in methods:
        method_overrides(m)
    if not methods:
        raise ValueError("no methods to compare")
    if "none" in methods:  # the reference of the paired differences comes first
        methods = ["none"] + [m for m in methods if m != "none"]
    return methods


def _binary_overrides(bundle: str, extra_configs: Sequence[str], overrides: dict, localization_method: str) -> dict:
    """``overrides`` with ``localization_method`` among the bundle's maps; refuses a bundle that is not binary."""
    parser = bundle_parser(bundle, ["train.yaml", *extra_configs], **overrides)
    if parser["label_mode"] != "binary":
        raise ValueError(f"compare handles binary bundles (one probability per image, one threshold); {bundle} is "
                         f"{parser['label_mode']!r}: use `cutremain experiment cv` for it")
    if localization_method not in parser["localization_methods"]:
        overrides = {**overrides, "localization_methods": [*parser["localization_methods"], localization_method]}
    return overrides


def _gamma_runs(gammas: Sequence[float], methods: list[str]) -> tuple[dict, list[tuple[str, dict]]]:
    """(gamma -> its run's name, the runs to add): gamma 0 is ``none``, gamma 1 ``cut_remain`` when compared."""
    gamma_alias, gamma_runs = {}, []
    for g in gammas:
        g = float(g)
        if not 0.0 <= g <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {g}")
        if g == 0.0 and "none" in methods:
            gamma_alias[g] = "none"
        elif g == 1.0 and "cut_remain" in methods:
            gamma_alias[g] = "cut_remain"
        else:
            gamma_alias[g] = _gamma_name(g)
            gamma_runs.append((_gamma_name(g), {"augmentation": "cut_remain", "guidance": "none", "gamma": g}))
    return gamma_alias, gamma_runs


def _plan(run_folds: list[int], methods: list[str], gamma_runs: list[tuple[str, dict]],
          gamma_folds_used: list[int]) -> list[tuple[int, str, dict]]:
    """(fold, run name, its overrides) of every run, in the order they are run."""
    # fold by fold (its methods, then its gamma runs): a comparison stopped early still has whole folds
    plan: list[tuple[int, str, dict]] = []
    for k in run_folds:
        plan += [(k, m, method_overrides(m)) for m in methods]
        plan += [(k, name, ov) for name, ov in gamma_runs if k in gamma_folds_used]
    return plan


def _run_dir(output_dir: str, k: int, name: str) -> str:
    """The folder of the run ``name`` on fold ``k``."""
    return os.path.join(output_dir, "runs", f"fold{k}", name.replace("+", "_plus_").replace("@", "_"))


def _finished(done: str, digest: str) -> bool:
    """Whether the run whose ``result.json`` is ``done`` has finished; refuses one made with other settings."""
    if not os.path.exists(done):
        return False
    with open(done) as f:
        previous = json.load(f).get("settings_hash")
    if previous is not None and previous != digest:  # (runs from before the hash was kept are taken as they are)
        raise ValueError(f"{done}: this run was made with other settings (overrides, configs, threshold rule or "
                         "seed); use a new output folder or delete the run")
    return True


def _run_plan(bundle: str, plan: list[tuple[int, str, dict]], fold_paths: list[str], output_dir: str,
              extra_configs: Sequence[str], overrides: dict, seed: int, threshold_rule: str, target_sensitivity: float,
              experiment: str) -> None:
    """Train and test every run of ``plan`` that has not finished (a finished one leaves ``result.json``)."""
    for i, (k, name, ov) in enumerate(plan):
        run_dir = _run_dir(output_dir, k, name)
        done = os.path.join(run_dir, "result.json")
        run_settings = {"configs": list(extra_configs), "overrides": {**overrides, **ov}, "threshold_rule": threshold_rule,
                        "target_sensitivity": target_sensitivity, "seed": seed}
        digest = hashlib.sha256(json.dumps(run_settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        if _finished(done, digest):
            continue
        logger.info("compare %d/%d: fold %d, %s", i + 1, len(plan), k, name)
        m = train_and_test(bundle, fold_paths[k], run_dir, extra_configs, seed=seed, register_model=False,
                           experiment_name=experiment, run_name=f"fold{k}_{name}", threshold_rule=threshold_rule,
                           target_sensitivity=target_sensitivity,
                           **with_study_store(output_dir, {**overrides, **ov}))
        with open(done, "w") as f:
            json.dump({"fold": k, "method": name, "overrides": ov, "settings_hash": digest, "settings": run_settings,
                       "test": m}, f, indent=1, default=str)


def _read_runs(plan: list[tuple[int, str, dict]], fold_paths: list[str], output_dir: str,
               localization_method: str) -> dict:
    """run name -> fold -> what :func:`_read_run` reads of it, plus its folder (``dir``)."""
    runs: dict = {}
    for k, name, _ in plan:
        with open(fold_paths[k]) as f:
            test_items = json.load(f)["test"]
        run_dir = _run_dir(output_dir, k, name)
        runs.setdefault(name, {})[k] = {**_read_run(run_dir, test_items, localization_method), "dir": run_dir}
    return runs


def compare(bundle: str, items: list[dict], output_dir: str, methods: Sequence[str], folds: int = 5, seed: int = 0,
            val_fraction: float = 0.2, extra_configs: Sequence[str] = ("cpu.yaml",), gammas: Sequence[float] = (),
            gamma_folds: int | None = None, threshold_rule: str = "youden", target_sensitivity: float = 0.9,
            localization_method: str = "gradcam", heatmap_images: int = 6, fold_limit: int | None = None,
            shrink: int | None = None, tracking: bool = True, n_boot: int = 2000, **overrides) -> dict:
    """Run (or resume) the comparison and write its tables, figures and ``report.html``; returns the summary.

    ``methods``: names for :func:`method_overrides` (binary bundles only); the reference of the paired differences is
    ``none`` when it is listed, else the first. ``gammas``: the annotation-budget curve on the first ``gamma_folds`` folds (all when None).
    ``fold_limit``: run only the first so many folds (a subsampled CPU setting; the report says so).
    ``shrink``: train on copies whose long side is this many pixels, made once
    (:func:`~cutremain_monai.data.resized_copies.resized_copies`; a CPU setting).
    ``overrides`` go to every run of the bundle (``epochs``, ``image_size``, ``network_depth``...).
    """
    methods = _ordered_methods(methods)
    overrides = _binary_overrides(bundle, extra_configs, overrides, localization_method)
    os.makedirs(output_dir, exist_ok=True)
    items = [{**it, "image_id": _key(it)} for it in items]
    if shrink:
        items = resized_copies(items, os.path.join(output_dir, f"images_{int(shrink)}"), int(shrink))
    fold_paths = _prepare_folds(items, output_dir, folds, seed, val_fraction, shrink)
    run_folds = list(range(folds if fold_limit is None else min(folds, fold_limit)))
    gamma_folds_used = run_folds if gamma_folds is None else run_folds[:gamma_folds]
    gamma_alias, gamma_runs = _gamma_runs(gammas, methods)
    plan = _plan(run_folds, methods, gamma_runs, gamma_folds_used)
    settings = {"bundle": os.path.basename(os.path.normpath(bundle)), "methods": methods, "folds": folds,
                "folds_run": len(run_folds), "gamma_folds": len(gamma_folds_used), "gammas": [float(g) for g in gammas],
                "seed": seed, "val_fraction": val_fraction, "threshold_rule": threshold_rule,
                "target_sensitivity": target_sensitivity, "localization_method": localization_method,
                "configs": ["train.yaml", *extra_configs], "overrides": overrides, "images": len(items),
                "shrink": shrink, "n_boot": n_boot}
    experiment = f"compare_{settings['bundle']}"
    _run_plan(bundle, plan, fold_paths, output_dir, extra_configs, overrides, seed, threshold_rule, target_sensitivity,
              experiment)
    runs = _read_runs(plan, fold_paths, output_dir, localization_method)
    summary = summarise_compare(runs, methods, gamma_alias, gamma_folds_used, n_boot=n_boot, seed=seed)
    summary["settings"] = settings
    write_tables(summary, output_dir)

    heat = _heatmaps(bundle, output_dir, fold_paths, runs, methods, run_folds, extra_configs, overrides,
                     localization_method, heatmap_images) if heatmap_images else None
    report = write_report(summary, runs, output_dir, heatmaps=heat)
    if tracking:
        _log_mlflow(output_dir, experiment, summary, report)
    return summary


def _heatmaps(bundle, output_dir, fold_paths, runs, methods, run_folds, extra_configs, overrides, method, limit):
    """The same boxed positive test images of the first fold that has them, with each method's map (``method``)."""
    import torch
    from monai.transforms import Compose

    for k in run_folds:
        with open(fold_paths[k]) as f:
            test_items = [it for it in json.load(f)["test"] if _label(it) and it.get("boxes")]
        if test_items:
            break
    else:
        return None
    grid = []
    for m in methods:
        run_dir = runs[m][k]["dir"]
        parser = bundle_parser(bundle, ["train.yaml", *extra_configs], **{**overrides, **method_overrides(m)},
                               output_dir=run_dir, device="cpu", datalist=fold_paths[k])
        net = load_network(parser, os.path.join(run_dir, "checkpoints", "model.pt"))
        load = CachedTransform(parser.get_parsed_content("load_transforms"), parser.get_parsed_content("cache_dir"))
        final = Compose(parser.get_parsed_content("final_transforms"))
        row = []
        for name, native, boxes, x, target in scored_cases(test_items, load, final, parser["label_mode"],
                                                     parser["class_names"], set(parser["lesion_box_labels"])):
            mp = upsample_map(compute_map(method, net, x[None], target, layer=parser["cam_layer"])[0, 0].detach(), native.shape)
            with torch.no_grad():
                p = float(torch.sigmoid(net(x[None])).reshape(-1)[target]) if parser["label_mode"] != "multiclass" else float("nan")
            row.append({"name": name, "image": native, "boxes": np.asarray(boxes), "map": mp, "prob": p})
            if len(row) >= limit:
                break
        grid.append((m, row))
    return {"fold": k, "method": method, "grid": grid}


def _log_mlflow(output_dir: str, experiment: str, summary: dict, report: dict) -> None:
    import mlflow

    mlflow.set_tracking_uri(default_tracking_uri(output_dir))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="compare_report"):
        s = summary["settings"]
        mlflow.log_params({"methods": ",".join(s["methods"]), "folds": s["folds"], "folds_run": s["folds_run"],
                           "threshold_rule": s["threshold_rule"], "seed": s["seed"], "images": s["images"]})
        for r in summary["table"]:
            vals = {"pooled_auc": r["pooled_auc"], "pooled_auc_low": r["pooled_auc_low"], "pooled_auc_high": r["pooled_auc_high"],
                    "sensitivity": r["sensitivity"][0], "specificity": r["specificity"][0], "brier": r["brier"]}
            mlflow.log_metrics({f"{r['method'].replace('+', '_')}_{k}": float(v) for k, v in vals.items() if np.isfinite(v)})
        for d in summary["paired"]:
            if np.isfinite(d["difference"]):
                mlflow.log_metrics({f"{d['method'].replace('+', '_')}_auc_diff": d["difference"], f"{d['method'].replace('+', '_')}_auc_diff_p": d["p"]})
        mlflow.log_artifact(report["html"])
        for path in report["figures"] + [os.path.join(output_dir, n) for n in ("compare_table.md", "compare_summary.json")]:
            mlflow.log_artifact(path, artifact_path="figures" if path.endswith(".png") else None)
