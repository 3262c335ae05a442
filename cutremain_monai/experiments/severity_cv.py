"""Choosing a small-data COVID severity setting by cross-validation on the dev data only, then one look at the test
section, run by ``cutremain experiment severity-cv``.

The dev data are the datalist's training and validation sections together; ``folds`` folds are drawn by patient
group (:func:`~cutremain_monai.io.datalist.kfold_by_group`), the same for every setting. For each setting (a name
and bundle overrides) and fold, the bundle trains on the other folds and is scored on the held-out fold with the
test-time ensemble of its last epoch checkpoints (``ensemble_last``), which does not depend on a validation choice
(the held-out fold is also the bundle's validation section, so its ``model.pt`` is never used). The constant and
zone-intensity baselines are fitted on the same training folds and scored on the same held-out folds.
``severity_cv.md``: per setting and baseline, the mean +/- sd over folds of MSE, Pearson and mean zone AUC of the
global score against the reference rater.

The setting with the lowest mean CV MSE is **chosen on the dev data**; then, once, on the test section: the
**fold ensemble** of each setting (the average zone probabilities of its ``folds`` models, each trained on part of
the dev data) beside the baselines fitted on all of the dev data (``severity_cv_test.md``). The test section is
never used to choose. Finished folds are reused (``cv_metrics.json`` in each run folder).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from cutremain_monai.constants import BRIXIA_ZONES
from cutremain_monai.engines.bundle import bundle_parser, run_bundle
from cutremain_monai.io.datalist import kfold_by_group, load_datalist
from cutremain_monai.metrics.severity import severity_metrics, severity_table
from cutremain_monai.metrics.severity_baselines import severity_baselines

__all__ = ["severity_cv", "DEFAULT_SETTINGS"]

logger = logging.getLogger(__name__)

# what was tried (no pretrained weights): today's CPU setting, a smaller transformer, random DenseNet features
# frozen (only the transformer and head learn), and the small random affine / intensity augmentation
DEFAULT_SETTINGS = {
    "today": {},
    "small_head": {"vit": {"embed_dim": 96, "depth": 2, "num_heads": 3, "mlp_dim": 192}},
    "frozen_features": {"freeze_features": True},
    "augment": {"augment_prob": 0.8},
}


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")) if len(v) else (float("nan"), float("nan"))


def _predictions(path: str) -> dict[str, np.ndarray]:
    with open(path) as f:
        return {r["file"]: np.array([float(r[f"p_{z}"]) for z in BRIXIA_ZONES]) for r in csv.DictReader(f) if not r["error"]}


def _name(item: dict) -> str:
    return str(item.get("image_id") or item["image"])


def severity_cv(bundle: str, datalist: str, output_dir: str, settings: Mapping[str, dict] | None = None, folds: int = 3,
                seed: int = 0, configs: Sequence[str] = ("train.yaml", "cpu.yaml"), task: str | None = None,
                fold_limit: int | None = None, **common) -> dict:
    """Run (or resume) the CV and the test look (module doc); returns ``{"cv": ..., "chosen": name, "test": ...}``.
    ``fold_limit``: run only the first so many of the ``folds`` folds (a subsampled setting: the tables say so, and
    the test look is then the mean of that many fold models)."""
    settings = dict(settings or DEFAULT_SETTINGS)
    if not settings:
        raise ValueError("no settings to compare")
    os.makedirs(output_dir, exist_ok=True)
    dev = load_datalist(datalist, "training", task=task) + load_datalist(datalist, "validation", task=task)
    test = load_datalist(datalist, "test", task=task)
    splits = kfold_by_group(dev, folds, seed)
    run_folds = len(splits) if fold_limit is None else max(1, min(len(splits), int(fold_limit)))
    splits = splits[:run_folds]
    common = {"register_model": False, "baselines": False, "overlays": 0, **common}
    preprocess = bundle_parser(bundle, configs, **common).get_parsed_content("preprocessing")
    cv: dict[str, list[dict]] = {name: [] for name in settings}
    cv["baseline: constant"], cv["baseline: zone_intensity"] = [], []
    test_preds: dict[str, list[dict]] = {name: [] for name in settings}
    for k, (train_items, held) in enumerate(splits):
        dl = os.path.join(output_dir, f"fold{k}_datalist.json")
        with open(dl, "w") as f:
            json.dump({"training": train_items, "validation": held, "test": held}, f)
        test_dl = os.path.join(output_dir, f"fold{k}_test_datalist.json")
        with open(test_dl, "w") as f:
            json.dump({"training": train_items, "validation": held, "test": test}, f)
        base = severity_baselines(train_items, held, preprocess)
        cv["baseline: constant"].append(base["constant"])
        cv["baseline: zone_intensity"].append(base["zone_intensity"])
        for name, overrides in settings.items():
            out = os.path.join(output_dir, name, f"fold{k}")
            done = os.path.join(out, "cv_metrics.json")
            run = {**common, **overrides, "output_dir": out, "datalist_task": None}
            if not os.path.exists(done):
                logger.info("severity CV: %s fold %d", name, k)
                run_bundle(bundle, configs, datalist=dl, **run)
                run_bundle(bundle, [*configs, "evaluate.yaml"], datalist=dl, **run)
                with open(os.path.join(out, "test_metrics.json")) as f:
                    held_metrics = json.load(f)
                run_bundle(bundle, [*configs, "evaluate.yaml"], datalist=test_dl, **run)  # the fold model on test
                os.replace(os.path.join(out, "test_severity.csv"), os.path.join(out, "test_section_severity.csv"))
                with open(done, "w") as f:
                    json.dump(held_metrics, f, indent=1, default=str)
            with open(done) as f:
                cv[name].append(json.load(f))
            test_preds[name].append(_predictions(os.path.join(out, "test_section_severity.csv")))
    summary = {}
    for name, rows in cv.items():
        summary[name] = {m: _mean_sd([r[m] for r in rows]) for m in ("mse", "pearson", "mean_zone_auc")}
    chosen = min(settings, key=lambda n: summary[n]["mse"][0])
    subsampled = f" (only the first {run_folds} of the {folds} folds were run)" if run_folds < folds else ""
    lines = [f"{folds}-fold CV on the dev data ({len(dev)} images; training + validation sections, split by patient)"
             f"{subsampled}; mean +/- sd over the folds run of the held-out folds' global-score metrics against the "
             "reference rater.", "",
             "| setting | overrides | MSE | Pearson | mean zone AUC |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        ov = json.dumps(settings.get(name, {})) if name in settings else "fitted on the training folds"
        lines.append(f"| {name}{' (chosen)' if name == chosen else ''} | `{ov}` | " + " | ".join(
            f"{s[m][0]:.3f}" + (f" +/- {s[m][1]:.3f}" if np.isfinite(s[m][1]) else "")
            for m in ("mse", "pearson", "mean_zone_auc")) + " |")
    with open(os.path.join(output_dir, "severity_cv.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    # the test look: fold ensembles and the baselines fitted on all of the dev data
    y = {_name(it): np.asarray(it["zone_scores"], dtype=float) for it in test if it.get("zone_scores") is not None}
    test_metrics = {}
    for name, preds in test_preds.items():
        files = [f for f in y if all(f in p for p in preds)]
        if not files:
            continue
        p = np.stack([np.mean([pr[f] for pr in preds], axis=0) for f in files])
        test_metrics[f"{name} (fold ensemble of {run_folds})"] = severity_metrics(np.stack([y[f] for f in files]), p)
    base = severity_baselines(dev, test, preprocess)
    chosen_key = f"{chosen} (fold ensemble of {run_folds})"
    table = severity_table(test_metrics.get(chosen_key), None, model_name=chosen_key + ", chosen on CV",
                           rater_name="", baselines={"constant": base["constant"], "zone_intensity": base["zone_intensity"]})
    others = [f"| {k} | {m['n']} | {m['mse']:.3f} | {m['mae']:.3f} | {m['pearson']:.3f} | {m['r2']:.3f} | "
              f"{m['mean_zone_auc']:.3f} |" for k, m in test_metrics.items() if k != chosen_key]
    head, sep, *rest = table.splitlines()
    text = "\n".join([head, sep, rest[0], *others, *rest[1:]]) + "\n"
    with open(os.path.join(output_dir, "severity_cv_test.md"), "w") as f:
        f.write(text)
    result = {"cv": summary, "chosen": chosen, "test": test_metrics, "baselines_test": base, "settings": settings,
              "folds": folds, "folds_run": run_folds, "dev_images": len(dev)}
    with open(os.path.join(output_dir, "severity_cv.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return result
