"""Where the model looks, measured: maps of several methods for the boxed images of a datalist section, scored with
the localisation metrics, written as a per-image CSV, a method x metric table, side-by-side overlays, and MLflow.

Used by ``cutremain localize`` and by the classification bundles' ``evaluate.yaml`` (``LocalizationReport``), so
both give the same table for the same model and images. Each image goes through the bundle's own chain in two
parts, ``load_transforms`` (native resolution: halves, boxes in their pixels) and ``final_transforms`` (the model's
input size); maps are computed at the model's size and brought back to the native sample size (bilinear) before
scoring against the native boxes, so no box is rounded to a coarse grid. Only positive samples with a lesion box
are scored, for the class they are positive for (binary: the one logit; multi-class: the labelled class;
multi-label: the class named by the first lesion box, else the first positive class).

Metrics (``cutremain_monai.metrics.localization``): energy in box, pointing game, IoU accuracy at 0.5 (largest
component of the min-max map at 0.5), MaxBoxAcc (v1), and Loc. Acc. (IoU >= 0.4) at the threshold chosen on the
validation section when one is given (never on the section reported), else reported as "max over tau" and marked.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cutremain_monai.metrics import localization as M

__all__ = ["METHODS", "compute_map", "positive_classes", "localize_items", "localize"]

logger = logging.getLogger(__name__)
METHODS = ("cam", "gradcam", "gradcam_pp", "lrp", "targetness", "psl")


def compute_map(method: str, model: torch.nn.Module, x: torch.Tensor, target: int, layer: str | None = None,
                bounds=None, **kwargs) -> torch.Tensor:
    """Raw ``(B, 1, H, W)`` map of ``method`` for class ``target`` at the input's size (not normalised).
    ``"targetness"``: ``model`` is a background-learning patch classifier (``target`` unused) and ``kwargs`` go to
    :func:`~cutremain_monai.localization.targetness.targetness_map` (``window``, ``stride``, ...). ``"psl"``: ``model`` is a
    :class:`~cutremain_monai.networks.psl.PSLNet`; the map is its class-weighted probability of ``target``."""
    if method == "psl":  # a lesion-segmentation network: its class-weighted probability of class `target`
        return model(x)[:, target + 1 : target + 2].float()
    if method == "targetness":
        from cutremain_monai.localization.targetness import targetness_map

        return targetness_map(model, x, **kwargs)
    if method == "cam":
        from cutremain_monai.localization.cam import cam

        return cam(model, x, target=target, normalise=False)
    if method in ("gradcam", "gradcam_pp"):
        from cutremain_monai.localization.grad_cam import DEFAULT_LAYER, grad_cam

        return grad_cam(model, x, target=target, layer=layer or DEFAULT_LAYER, plus_plus=method == "gradcam_pp",
                        normalise=False)
    if method == "lrp":
        from cutremain_monai.localization.lrp import lrp

        return lrp(model, x, target=target, bounds=bounds)
    raise ValueError(f"unknown localisation method {method!r}; choose from {', '.join(METHODS)}")


def positive_classes(label, label_mode: str) -> list[int]:
    """The classes whose CAM is mined for a sample: binary -> [0] (the one logit) when positive; multi-class ->
    the labelled class unless it is class 0 (normal); multi-label -> every positive class."""
    y = np.asarray(torch.as_tensor(label).detach().cpu() if isinstance(label, torch.Tensor) else label, dtype=float).reshape(-1)
    if label_mode == "binary":
        return [0] if y.size and y[0] > 0.5 else []
    if label_mode == "multiclass":
        c = int(y.argmax()) if y.size > 1 else int(y[0])
        return [c] if c != 0 else []
    return [int(i) for i in np.flatnonzero(y > 0.5)]


def _target(sample: dict, label_mode: str, class_names: Sequence[str], lesion_labels) -> int | None:
    """The class explained for a sample: its positive class (:func:`positive_classes`); for multi-label, the one
    named by its first lesion box when that class is positive, else the first positive class."""
    classes = positive_classes(sample.get("label", 0), label_mode)
    if not classes:
        return None
    if label_mode == "multilabel":
        for lab in sample.get("box_labels") or []:
            if lab in class_names and (lesion_labels is None or lab in lesion_labels):
                c = list(class_names).index(lab)
                if c in classes:
                    return c
    return classes[0]


def _lesion_boxes(sample: dict, lesion_labels) -> np.ndarray:
    boxes = np.asarray(sample.get("boxes", []), dtype=np.float64).reshape(-1, 4)
    labels = list(sample.get("box_labels") or [None] * len(boxes))
    keep = [i for i, lab in enumerate(labels) if lesion_labels is None or lab in lesion_labels]
    return boxes[keep]


def _cases(items, load: Callable, final: Callable, label_mode, class_names, lesion_labels):
    """(name, native image (H, W), native boxes, model input (1, h, w), target) per scored sample."""
    for it in items:
        try:
            samples = load(dict(it))
        except Exception as e:  # an unreadable image is named and left out, never ends the report
            logger.warning("localisation: %s set aside (%s: %s)", it.get("image"), type(e).__name__, e)
            continue
        for s in samples if isinstance(samples, list) else [samples]:
            boxes = _lesion_boxes(s, lesion_labels)
            target = _target(s, label_mode, class_names, lesion_labels)
            if target is None or len(boxes) == 0:
                continue
            native = torch.as_tensor(s["image"]).float()
            x = final(dict(s))
            x = x[0] if isinstance(x, list) else x
            name = os.path.basename(str(it["image"])) + (f"#{s['half']}" if s.get("half") else "")
            yield name, native[0].numpy(), boxes, torch.as_tensor(x["image"]).float(), target


def _upsample(m: torch.Tensor, size) -> np.ndarray:
    return F.interpolate(m[None, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def _maps(model, cases, methods, layer, bounds, method_kwargs=None):
    device = next(model.parameters()).device
    out = []
    for name, native, boxes, x, target in cases:
        maps = {}
        for method in methods:
            m = compute_map(method, model, x[None].to(device), target, layer=layer, bounds=bounds,
                            **(method_kwargs or {}).get(method, {}))[0, 0].detach().cpu()
            maps[method] = _upsample(m, native.shape)
        out.append((name, native, boxes, target, maps))
    return out


def _score(results, methods, tau_from: dict | None) -> tuple[list[dict], dict, dict]:
    """Per-image scores, the table, and the Loc. Acc. threshold each method would choose on these images. Images are
    scored one by one (their native sizes differ) and the per-threshold hits averaged, which is what the metrics'
    batch forms compute for same-size maps."""
    rows, table, taus = [], {}, {}
    for method in methods:
        if not results:
            table[method] = {}
            continue
        energy, hits, iou05, hit05, mba, loc = [], [], [], [], [], []
        first_row = len(rows)
        for name, _, boxes, target, maps in results:
            m, b = maps[method], [boxes]
            e = float(M.energy_in_box(m, b)["per_image"][0])
            h = int(M.pointing_game(m, b)["hits"][0])
            r = M.iou_accuracy(m, b, thresholds=(0.5,), iou=0.5)
            mb = M.max_box_acc(m, b, iou=0.5)
            la = M.loc_acc(m, b, iou=0.4)
            energy.append(e)
            hits.append(h)
            iou05.append(float(r["overlaps"][0, 0]))
            hit05.append(float(r["correct"][0, 0]))
            mba.append(np.asarray(mb["correct"][0], dtype=float))
            loc.append(np.asarray(la["correct"][0], dtype=float))
            rows.append({"image": name, "method": method, "class": target, "energy_in_box": round(e, 5),
                         "pointing_hit": h, "iou@0.5": round(iou05[-1], 5),
                         "flat": int(float(np.max(m)) - float(np.min(m)) <= 1e-12 * max(1.0, abs(float(np.max(m)))))})
        loc_thresholds = np.asarray(la["thresholds"], dtype=float)
        loc_curve = np.mean(loc, axis=0)
        own_tau = M.choose_tau({"thresholds": loc_thresholds, "accuracy": loc_curve})
        taus[method] = own_tau
        if tau_from and method in tau_from:
            k = int(np.argmin(np.abs(loc_thresholds - tau_from[method])))
            loc_value, loc_note = float(loc_curve[k]), f"tau {tau_from[method]:.2f} from validation"
        else:
            k = int(np.argmax(loc_curve))
            loc_value, loc_note = float(loc_curve.max()), "max over tau on this set"
        for row, hit in zip(rows[first_row:], loc):  # the image's Loc. Acc. hit at the tau the table uses
            row["loc_hit"] = int(hit[k])
        table[method] = {"energy_in_box": float(np.nanmean(energy)) if np.isfinite(energy).any() else float("nan"),
                         "pointing_game": float(np.mean(hits)), "iou_acc@0.5": float(np.mean(hit05)),
                         "max_box_acc": float(np.mean(mba, axis=0).max()), "loc_acc": loc_value,
                         "loc_acc_tau": loc_note, "n": len(results),
                         "loc_acc_by_tau": {f"{t:.2f}": float(a) for t, a in zip(loc_thresholds, loc_curve)}}
    return rows, table, taus


def _table_md(table: dict) -> str:
    lines = ["| method | energy in box | pointing game | IoU acc @0.5 | MaxBoxAcc | Loc. Acc. (IoU >= 0.4) | images |",
             "|---|---|---|---|---|---|---|"]
    for method, t in table.items():
        if not t:
            lines.append(f"| {method} | - | - | - | - | - | 0 |")
            continue
        lines.append(f"| {method} | {t['energy_in_box']:.3f} | {t['pointing_game']:.3f} | {t['iou_acc@0.5']:.3f} | "
                     f"{t['max_box_acc']:.3f} | {t['loc_acc']:.3f} ({t['loc_acc_tau']}) | {t['n']} |")
    return "\n".join(lines) + "\n"


def _overlays(results, methods, out_dir: str, limit: int) -> int:
    from PIL import Image

    from cutremain_monai.localization.cam import overlay_image

    os.makedirs(out_dir, exist_ok=True)
    for k, (name, native, boxes, _, maps) in enumerate(results[:limit]):
        tiles = []
        for method in methods:
            m = maps[method]
            lo, hi = float(m.min()), float(m.max())
            norm = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
            tiles.append(overlay_image(native, norm, boxes.tolist(), title=method))
        w, h = sum(t.width for t in tiles), max(t.height for t in tiles)
        grid = Image.new("RGB", (w, h))
        x = 0
        for t in tiles:
            grid.paste(t, (x, 0))
            x += t.width
        grid.save(os.path.join(out_dir, f"case_{k:03d}_{name.replace('#', '_')}.png"))
    return min(limit, len(results))


def localize_items(model: torch.nn.Module, items: Sequence[dict], load: Callable, final: Callable, output_dir: str,
                   methods: Sequence[str] = ("cam", "gradcam", "lrp"), label_mode: str = "binary",
                   class_names: Sequence[str] = (), lesion_box_labels=None, prefix: str = "test",
                   val_items: Sequence[dict] | None = None, layer: str | None = None, bounds=None, overlays: int = 16,
                   tracking_uri: str | None = None, experiment_name: str = "localization", run_name: str | None = None,
                   method_kwargs: dict | None = None) -> dict:
    """Score ``methods`` on ``items`` (module doc); writes ``{prefix}_localization.csv``, ``{prefix}_localization_table.md``
    (``.json`` also, with Loc. Acc. at every threshold) and ``{prefix}_localization_overlays/``; returns the table
    ``{method: {metric: value}}``. ``method_kwargs``: ``{method: {argument: value}}`` for :func:`compute_map`."""
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown localisation method {method!r}; choose from {', '.join(METHODS)}")
    lesion = None if lesion_box_labels is None else set(lesion_box_labels)
    was_training = model.training
    model.eval()
    try:
        taus = None
        if val_items:
            val = _maps(model, _cases(val_items, load, final, label_mode, class_names, lesion), methods, layer, bounds, method_kwargs)
            _, _, taus = _score(val, methods, None)
        results = _maps(model, _cases(items, load, final, label_mode, class_names, lesion), methods, layer, bounds, method_kwargs)
    finally:
        model.train(was_training)
    rows, table, _ = _score(results, methods, taus)
    os.makedirs(output_dir, exist_ok=True)
    csv_path = os.path.join(output_dir, f"{prefix}_localization.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "method", "class", "energy_in_box", "pointing_hit", "iou@0.5", "loc_hit", "flat"])
        w.writeheader()
        w.writerows(rows)
    md = os.path.join(output_dir, f"{prefix}_localization_table.md")
    with open(md, "w") as f:
        f.write(_table_md(table))
    with open(os.path.join(output_dir, f"{prefix}_localization.json"), "w") as f:
        json.dump({"methods": table, "validation_tau": taus or {}}, f, indent=1)
    ov_dir = os.path.join(output_dir, f"{prefix}_localization_overlays")
    _overlays(results, methods, ov_dir, overlays)
    if tracking_uri:
        _log_mlflow(tracking_uri, experiment_name, run_name or prefix, table, [csv_path, md], ov_dir)
    logger.info("localisation (%d samples):\n%s", len(results), _table_md(table))
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


def localize(bundle: str, checkpoint: str, datalist: str, output_dir: str, section: str = "test",
             methods: Sequence[str] = ("cam", "gradcam", "lrp"), configs: Sequence[str] = ("train.yaml", "cpu.yaml"),
             task: str | None = None, tau_section: str | None = "validation", tracking_uri: str | None = None,
             overlays: int = 16, bounds=(0.0, 1.0), **overrides) -> dict:
    """``cutremain localize``: the bundle's network with ``checkpoint`` on ``section`` of ``datalist``. ``bounds``:
    the input range for LRP's z^B rule (the classification bundles feed [0, 1] images)."""
    from monai.transforms import Compose

    from cutremain_monai.engines.experiment import bundle_parser
    from cutremain_monai.io.datalist import load_datalist
    from cutremain_monai.networks.ensemble import checkpoint_state

    parser = bundle_parser(bundle, configs, **overrides)
    model = parser.get_parsed_content("network_def", instantiate=True)
    model.load_state_dict(checkpoint_state(checkpoint))
    load = Compose(parser.get_parsed_content("load_transforms"))
    final = Compose(parser.get_parsed_content("final_transforms"))
    items = load_datalist(datalist, section, task=task)
    val_items = load_datalist(datalist, tau_section, task=task) if tau_section and tau_section != section else None
    return localize_items(model, items, load, final, output_dir, methods=methods,
                          label_mode=parser.get_parsed_content("label_mode"),
                          class_names=parser.get_parsed_content("class_names"),
                          lesion_box_labels=parser.get_parsed_content("lesion_box_labels"), prefix=section,
                          val_items=val_items, layer=overrides.get("cam_layer"), bounds=bounds, overlays=overlays,
                          tracking_uri=tracking_uri, experiment_name=f"localize_{os.path.basename(os.path.normpath(bundle))}")
