"""Where the model looks, measured: maps of several methods for the boxed images of a datalist section, scored with
the localisation metrics, written as a per-image CSV, a method x metric table, side-by-side overlays, and MLflow.

:func:`localize_items` writes the report; ``cutremain localize`` (:mod:`cutremain_monai.experiments.localize`) and
the evaluator handler :class:`LocalizationReport` (the classification bundles' ``evaluate.yaml``) both call it, so
they give the same table for the same model and images. The maps come from
:mod:`cutremain_monai.localization.report`, the scores from :func:`cutremain_monai.metrics.localization.score_maps`:
energy in box, pointing game, IoU accuracy at 0.5 (largest component of the min-max map at 0.5), MaxBoxAcc (v1),
and Loc. Acc. (IoU >= 0.4) at the threshold chosen on the validation section when one is given (never on the
section reported), else reported as "max over tau" and marked. The handler runs on rank 0 only."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose

from cutremain_monai.data.preprocessed import CachedTransform
from cutremain_monai.handlers.utils import rank
from cutremain_monai.localization.report import case_maps, check_map_methods, scored_cases, write_overlays
from cutremain_monai.metrics.localization import localization_table_md, score_maps

__all__ = ["LocalizationReport", "localize_items"]

logger = logging.getLogger(__name__)


def localize_items(model: torch.nn.Module, items: Sequence[dict], load: Callable, final: Callable, output_dir: str,
                   methods: Sequence[str] = ("cam", "gradcam", "lrp"), label_mode: str = "binary",
                   class_names: Sequence[str] = (), lesion_box_labels=None, prefix: str = "test",
                   val_items: Sequence[dict] | None = None, layer: str | None = None, bounds=None, overlays: int = 16,
                   tracking_uri: str | None = None, experiment_name: str = "localization", run_name: str | None = None,
                   method_kwargs: dict | None = None) -> dict:
    """Score ``methods`` on ``items`` (module doc); writes ``{prefix}_localization.csv``, ``{prefix}_localization_table.md``
    (``.json`` also, with Loc. Acc. at every threshold) and ``{prefix}_localization_overlays/``; returns the table
    ``{method: {metric: value}}``. ``method_kwargs``: ``{method: {argument: value}}`` for :func:`~cutremain_monai.localization.report.compute_map`."""
    methods = check_map_methods(methods)
    lesion = None if lesion_box_labels is None else set(lesion_box_labels)
    was_training = model.training
    model.eval()
    try:
        taus = None
        if val_items:
            val = case_maps(model, scored_cases(val_items, load, final, label_mode, class_names, lesion), methods, layer, bounds, method_kwargs)
            _, _, taus = score_maps(val, methods, None)
        results = case_maps(model, scored_cases(items, load, final, label_mode, class_names, lesion), methods, layer, bounds, method_kwargs)
    finally:
        model.train(was_training)
    rows, table, _ = score_maps(results, methods, taus)
    os.makedirs(output_dir, exist_ok=True)
    csv_path = os.path.join(output_dir, f"{prefix}_localization.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "method", "class", "energy_in_box", "pointing_hit", "iou@0.5", "loc_hit", "flat"])
        w.writeheader()
        w.writerows(rows)
    md = os.path.join(output_dir, f"{prefix}_localization_table.md")
    with open(md, "w") as f:
        f.write(localization_table_md(table))
    with open(os.path.join(output_dir, f"{prefix}_localization.json"), "w") as f:
        json.dump({"methods": table, "validation_tau": taus or {}}, f, indent=1)
    ov_dir = os.path.join(output_dir, f"{prefix}_localization_overlays")
    write_overlays(results, methods, ov_dir, overlays)
    if tracking_uri:
        _log_mlflow(tracking_uri, experiment_name, run_name or prefix, table, [csv_path, md], ov_dir)
    logger.info("localisation (%d samples):\n%s", len(results), localization_table_md(table))
    return table


def _log_mlflow(uri, experiment, run_name, table, files, folder) -> None:
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=run_name):
            mlflow.log_metrics({f"{m}_{k}".replace("@", "_at_"): float(v) for m, t in table.items() for k, v in t.items()
                                if isinstance(v, (int, float)) and np.isfinite(v)})
            for p in files:
                mlflow.log_artifact(p)
            if os.path.isdir(folder):
                mlflow.log_artifacts(folder, artifact_path=os.path.basename(folder))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v




class LocalizationReport:
    """:func:`localize_items` when the evaluator completes (rank 0). ``cache_dir``: the native-size loads of the
    boxed images go through the persistent cache (:class:`~cutremain_monai.data.preprocessed.CachedTransform`), so
    the runs of a comparison decode each of them once."""

    def __init__(self, network: torch.nn.Module, items: Sequence[dict], load_transforms, final_transforms, output_dir: str,
                 methods: Sequence[str] = ("cam", "gradcam", "lrp"), label_mode: str = "binary", class_names=(),
                 lesion_box_labels=None, prefix: str = "test", val_items: Sequence[dict] | None = None, overlays: int = 8,
                 layer: str | None = None, bounds=(0.0, 1.0), enabled: bool = True, method_kwargs: dict | None = None,
                 cache_dir: str | None = None):
        self.network, self.items, self.val_items = network, list(items), list(val_items or [])
        self.load, self.final = CachedTransform(list(load_transforms), cache_dir), Compose(list(final_transforms))
        self.output_dir, self.methods, self.prefix = output_dir, list(methods), prefix
        self.label_mode, self.class_names, self.lesion = label_mode, list(class_names or []), lesion_box_labels
        self.overlays, self.layer, self.bounds, self.enabled = overlays, layer, bounds, enabled
        self.method_kwargs = method_kwargs
        self.table: dict = {}

    def attach(self, engine: Engine) -> None:
        if self.enabled and not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled or rank() != 0:
            return
        net = self.network.module if hasattr(self.network, "module") else self.network
        self.table = localize_items(net, self.items, self.load, self.final, self.output_dir, methods=self.methods,
                                    label_mode=self.label_mode, class_names=self.class_names,
                                    lesion_box_labels=self.lesion, prefix=self.prefix, val_items=self.val_items or None,
                                    layer=self.layer, bounds=self.bounds, overlays=self.overlays,
                                    method_kwargs=self.method_kwargs)
        for method, t in self.table.items():
            for k, v in t.items():
                if isinstance(v, float):
                    engine.state.metrics[f"{self.prefix}_{method}_{k}"] = v
