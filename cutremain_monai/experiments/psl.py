"""AE-PSL end to end (seed 002): adversarial erasing -> pseudo-masks -> PSL (and PSL with SEC's losses) -> one
localisation table, run by ``cutremain experiment psl``.

1. :func:`~cutremain_monai.experiments.erasing.adversarial_erasing` on a classification bundle (``erasing/``; reused
   when ``erasing/mined_datalist.json`` exists).
2. :func:`build_pseudo_masks`: per training image, the label map of
   :func:`~cutremain_monai.localization.pseudo_masks.pseudo_mask` from the mined union (the lesion), the CAM of
   round 1's classifier (trained on the original images; low CAM = background) and an Otsu body mask, saved as
   8-bit PNG under ``pseudo_masks/seg_labels/`` and listed as ``seg_label`` in ``pseudo_masks/datalist.json``
   (negative images get none: the bundle makes them all background). ``pseudo_masks/pseudo_masks.csv`` gives each
   map's shares of lesion / background / ignore and, where the image has boxes, the share of its lesion pixels
   inside them.
3. The lesion-segmentation bundle trained on that datalist, once plain (``psl/``) and once with ``sec: true``
   (``psl_sec/``); a finished run (its ``done.json``) is reused.
4. :func:`localisation_table` on the test images with a positive label and boxes: CAM of round 1's classifier,
   the erasing union (the used rounds' classifiers applied in turn to the test image, each round's region erased
   before the next, as in training), PSL, PSL + SEC; energy in box, pointing game, IoU accuracy, MaxBoxAcc and
   Loc. Acc. with each method's threshold chosen on the validation images (never on test). Writes
   ``psl_localization_table.md`` / ``.json`` / ``.csv`` and overlays.

The erasing union is a binary map: every threshold gives the same region, and its pointing-game point is the first
mined pixel in raster order (a hit only when that pixel lies in a box); an image with nothing mined is a flat map
(a miss). Classification bundles that split images into halves are run whole (``split_halves: false``), so that
all methods see the same images.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Sequence

import numpy as np
import torch

from cutremain_monai.engines.bundle import bundle_parser, load_network, run_bundle
from cutremain_monai.experiments.erasing import adversarial_erasing, mined_region
from cutremain_monai.io.datalist import load_datalist
from cutremain_monai.io.loader import load_xray, save_png16
from cutremain_monai.io.paths import unique_stem
from cutremain_monai.localization.erasing import erase
from cutremain_monai.localization.normalise import normalise_map
from cutremain_monai.localization.pseudo_masks import IGNORE, body_mask, pseudo_mask
from cutremain_monai.localization.report import (compute_map, lesion_boxes, positive_class_maps, positive_classes,
                                                 scored_cases, upsample_map, write_overlays)
from cutremain_monai.metrics.localization import localization_table_md, score_maps
from cutremain_monai.transforms.hide_and_seek import dataset_mean

__all__ = ["build_pseudo_masks", "localisation_table", "psl_experiment"]

logger = logging.getLogger(__name__)
METHOD_NAMES = ("cam", "erasing_union", "psl", "psl_sec")


def _classifier(bundle: str, configs: Sequence[str], out: str, settings: dict):
    parser = bundle_parser(bundle, configs, **{**settings, "output_dir": out})
    return parser, load_network(parser)


def class_maps(item: dict, preprocess, model, label_mode: str, classes: int, shape, pool: str = "avgpool") -> np.ndarray:
    """``(C, H, W)`` min-max normalised CAM of each class at the image's native ``shape`` (bilinear), for the
    positive classes of ``item`` (zeros for the others)."""
    s = preprocess(dict(item))
    s = s[0] if isinstance(s, list) else s
    out = np.zeros((classes, *shape), dtype=np.float64)
    for c, m in positive_class_maps(model, s, label_mode, pool=pool).items():
        out[c] = normalise_map(upsample_map(m, shape))
    return out


def build_pseudo_masks(bundle: str, erasing_dir: str, output_dir: str, bg_threshold: float = 0.2,
                       body_min_area: float = 0.01, use_body: bool = True,
                       configs: Sequence[str] = ("train.yaml", "cpu.yaml"), pool: str = "avgpool", **overrides) -> str:
    """Step 2 of the module doc; returns the path of the pseudo-mask datalist. ``use_body=False`` leaves the body
    mask out (background from low CAM alone): for images where the body is not brighter than the air around it.
    ``pseudo_masks.csv`` also gives each image's body share and the share of its mined pixels outside the body
    (a high share says the body rule is wrong for these images)."""
    from PIL import Image

    with open(os.path.join(erasing_dir, "mined_datalist.json")) as f:
        mined = json.load(f)
    settings = {"augmentation": "none", "register_model": False, "cam_images": 0, **overrides}
    parser, model = _classifier(bundle, configs, os.path.join(erasing_dir, "round1", "bundle"), settings)
    label_mode = parser.get_parsed_content("label_mode")
    classes = len(parser.get_parsed_content("class_names")) if label_mode != "binary" else 1
    preprocess = parser.get_parsed_content("preprocessing")
    os.makedirs(os.path.join(output_dir, "seg_labels"), exist_ok=True)
    with open(os.path.join(erasing_dir, "round1", "datalist.json")) as f:  # the annotated boxes (mined ones replace them)
        originals = json.load(f)["training"]
    lesion = _lesion_labels(parser)
    output_dir = os.path.abspath(output_dir)  # the datalist holds absolute map paths: it is read from anywhere
    seen: dict = {}
    training, rows = [], []
    for it, original in zip(mined["training"], originals):
        stem = unique_stem(it["image"], seen)
        y = np.zeros(classes)
        for c in positive_classes(it.get("label", 0), label_mode):
            y[c] = 1
        if not y.any():
            training.append({k: v for k, v in it.items() if k not in ("mined", "mined_mask")})
            continue
        try:
            image = load_xray(it["image"]).numpy()[0]
        except Exception as e:  # noqa: BLE001 (named, kept without a map; the bundle sets it aside again)
            logger.warning("pseudo-masks: %s has no map (%s: %s)", it["image"], type(e).__name__, e)
            training.append(dict(it))
            continue
        union = np.zeros(image.shape, dtype=bool)
        if it.get("mined_mask") and os.path.exists(it["mined_mask"]):
            union = np.asarray(Image.open(it["mined_mask"])) > 127
        region = np.stack([union & (y[c] > 0) for c in range(classes)])
        cams = class_maps(it, preprocess, model, label_mode, classes, image.shape, pool)
        body = body_mask(image, body_min_area) if use_body else np.ones(image.shape, dtype=bool)
        pm = pseudo_mask(y, region, cams, body, bg_threshold)  # (absent classes' maps are zeros: they never block)
        path = os.path.join(output_dir, "seg_labels", stem + ".png")
        Image.fromarray(pm).save(path)
        entry = {k: v for k, v in it.items() if k not in ("mined", "mined_mask", "boxes", "box_labels")}
        training.append({**entry, "seg_label": path})  # (mined boxes are not annotations: left out)
        row = {"image": stem, "lesion": round(float(((pm > 0) & (pm != IGNORE)).mean()), 5),
               "background": round(float((pm == 0).mean()), 5), "ignore": round(float((pm == IGNORE).mean()), 5),
               "body": round(float(body.mean()), 4),
               "mined_outside_body": round(float((union & ~body).sum() / union.sum()), 4) if union.any() else "",
               "lesion_in_box": ""}
        boxes = lesion_boxes(original, lesion)
        if len(boxes) and row["lesion"] > 0:
            inside = np.zeros(image.shape, dtype=bool)
            for x0, y0, x1, y1 in boxes:
                inside[int(max(0, y0)):int(np.ceil(y1)), int(max(0, x0)):int(np.ceil(x1))] = True
            lesion_px = (pm > 0) & (pm != IGNORE)
            row["lesion_in_box"] = round(float((lesion_px & inside).sum() / lesion_px.sum()), 4)
        rows.append(row)
    out = os.path.join(output_dir, "datalist.json")
    with open(out, "w") as f:
        json.dump({"training": training, "validation": mined["validation"], "test": mined["test"]}, f, indent=1)
    with open(os.path.join(output_dir, "pseudo_masks.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "lesion", "background", "ignore", "body", "mined_outside_body",
                                          "lesion_in_box"])
        w.writeheader()
        w.writerows(rows)
    logger.info("pseudo-masks: %d maps of positive images -> %s", len(rows), out)
    return out


def _lesion_labels(parser):
    labels = parser.get_parsed_content("lesion_box_labels") if "lesion_box_labels" in parser else None
    return None if labels is None else set(labels)


def _used_rounds(erasing_dir: str) -> list[int]:
    with open(os.path.join(erasing_dir, "erasing_rounds.csv")) as f:
        return [int(r["round"]) for r in csv.DictReader(f) if r["used"] in ("True", "true", "1")]


def erasing_union(item: dict, preprocess, models: Sequence[torch.nn.Module], label_mode: str, fill: float,
                  q: float = 0.2, delta: float | None = None, pool: str = "avgpool", workdir: str | None = None) -> np.ndarray:
    """The erasing miner applied to one image with the rounds' classifiers (module doc): ``(H, W)`` bool union."""
    image = load_xray(item["image"]).numpy()[0]
    union = np.zeros(image.shape, dtype=bool)
    current = dict(item)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for t, model in enumerate(models):
            union |= mined_region(current, preprocess, model, label_mode, q, delta, pool, image.shape)
            if t + 1 < len(models):
                current = {**item, "image": save_png16(os.path.join(tmp, f"round{t + 2}.png"), erase(image, union, fill))}
    return union


def localisation_table(cls_bundle: str, seg_bundle: str, output_dir: str, datalist: str, erasing_dir: str,
                       seg_runs: dict[str, str], cls_configs: Sequence[str] = ("train.yaml", "cpu.yaml"),
                       seg_configs: Sequence[str] = ("train.yaml", "cpu.yaml"), q: float = 0.2, delta: float | None = None,
                       cls_overrides: dict | None = None, seg_overrides: dict | None = None, overlays: int = 8) -> dict:
    """Step 4 of the module doc; returns ``{method: {metric: value}}``."""
    cls_settings = {"augmentation": "none", "register_model": False, "cam_images": 0, **(cls_overrides or {})}
    rounds = _used_rounds(erasing_dir)
    parsers, models = zip(*[_classifier(cls_bundle, cls_configs, os.path.join(erasing_dir, f"round{t}", "bundle"), cls_settings)
                            for t in rounds])
    parser = parsers[0]
    label_mode = parser.get_parsed_content("label_mode")
    class_names = parser.get_parsed_content("class_names")
    lesion_set = _lesion_labels(parser)
    preprocess = parser.get_parsed_content("preprocessing")
    load, final = parser.get_parsed_content("load_transforms"), parser.get_parsed_content("final_transforms")
    from monai.transforms import Compose

    load, final = Compose(load), Compose(final)
    settings_file = os.path.join(erasing_dir, "erasing_settings.json")
    if os.path.exists(settings_file):  # the fill the rounds used in training
        with open(settings_file) as f:
            fill = float(json.load(f)["fill"])
    else:
        fill = dataset_mean(load_datalist(datalist, "training"))
    segs = {}
    for name, out in seg_runs.items():
        sp = bundle_parser(seg_bundle, seg_configs, **{**(seg_overrides or {}), "output_dir": out, "datalist": datalist,
                                                        "datalist_task": None})
        segs[name] = (load_network(sp), Compose(sp.get_parsed_content("load_transforms")),
                      Compose(sp.get_parsed_content("final_transforms")))

    def results_for(section: str) -> list:
        items = load_datalist(datalist, section)
        by_name = {}
        for name, native, boxes, x, target in scored_cases(items, load, final, label_mode, class_names, lesion_set):
            raw = compute_map("cam", models[0], x[None], target)[0, 0].detach().cpu()
            maps = {"cam": normalise_map(upsample_map(raw, native.shape))}  # (signed raw CAM: energy needs >= 0)
            by_name[name] = [name, native, boxes, target, maps]
        for it in items:
            name = os.path.basename(str(it["image"]))
            if name in by_name:
                by_name[name][4]["erasing_union"] = erasing_union(it, preprocess, models, label_mode, fill, q, delta,
                                                                  workdir=output_dir).astype(np.float64)
        for method, (net, sload, sfinal) in segs.items():
            for name, native, _, x, target in scored_cases(items, sload, sfinal, label_mode, class_names, lesion_set):
                if name in by_name:
                    with torch.no_grad():
                        m = compute_map("psl", net, x[None], target)[0, 0].cpu()
                    by_name[name][4][method] = upsample_map(m, native.shape)
        return [tuple(v) for v in by_name.values() if all(k in v[4] for k in ["cam", "erasing_union", *segs])]

    methods = ["cam", "erasing_union", *segs]
    _, _, taus = score_maps(results_for("validation"), methods, None)
    test = results_for("test")
    rows, table, _ = score_maps(test, methods, taus)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "psl_localization_table.md"), "w") as f:
        f.write(localization_table_md(table))
    with open(os.path.join(output_dir, "psl_localization.json"), "w") as f:
        json.dump({"methods": table, "validation_tau": taus, "rounds_used": rounds}, f, indent=1)
    with open(os.path.join(output_dir, "psl_localization.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "method", "class", "energy_in_box", "pointing_hit", "iou@0.5", "loc_hit", "flat"])
        w.writeheader()
        w.writerows(rows)
    write_overlays(test, methods, os.path.join(output_dir, "psl_localization_overlays"), overlays)
    return table


def psl_experiment(cls_bundle: str, seg_bundle: str, datalist: str, output_dir: str, rounds: int = 3, q: float = 0.2,
                   delta: float | None = None, bg_threshold: float = 0.2, cls_configs: Sequence[str] = ("train.yaml", "cpu.yaml"),
                   seg_configs: Sequence[str] = ("train.yaml", "cpu.yaml"), cls_overrides: dict | None = None,
                   seg_overrides: dict | None = None, variants: Sequence[str] = ("psl", "psl_sec"), task: str | None = None,
                   overlays: int = 8) -> dict:
    """Steps 1-4 of the module doc; returns the localisation table. Binary classification bundles only (one lesion
    class): the erasing stage keeps one mined union per image, which cannot tell two classes apart. A folder made
    with other settings is refused (``psl_settings.json``)."""
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    cls_overrides = dict(cls_overrides or {})
    parser = bundle_parser(cls_bundle, cls_configs, **cls_overrides)
    if parser["label_mode"] != "binary":
        raise ValueError(f"psl handles binary bundles (one lesion class); {cls_bundle} is {parser['label_mode']!r}: the "
                         "erasing stage mines one region per image, which cannot be told apart between classes")
    if "split_halves" in parser:
        cls_overrides.setdefault("split_halves", False)
    lesion = _lesion_labels(parser)
    seg_overrides = {"class_names": list(parser.get_parsed_content("class_names"))[:1],
                     "target_box_labels": sorted(lesion) if lesion else list(parser.get_parsed_content("class_names"))[:1],
                     **(seg_overrides or {})}
    settings = {"rounds": rounds, "q": q, "delta": delta, "bg_threshold": bg_threshold, "cls_configs": list(cls_configs),
                "seg_configs": list(seg_configs), "cls_overrides": cls_overrides, "seg_overrides": seg_overrides,
                "datalist": os.path.abspath(datalist)}
    stamp = os.path.join(output_dir, "psl_settings.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            previous = json.load(f)
        if json.dumps(previous, sort_keys=True, default=str) != json.dumps(settings, sort_keys=True, default=str):
            raise ValueError(f"{output_dir} was made with other settings (see {stamp}); use a new output folder")
    else:
        with open(stamp, "w") as f:
            json.dump(settings, f, indent=1, default=str)
    erasing_dir = os.path.join(output_dir, "erasing")
    if not os.path.exists(os.path.join(erasing_dir, "mined_datalist.json")):
        adversarial_erasing(cls_bundle, datalist, erasing_dir, rounds=rounds, q=q, delta=delta, configs=cls_configs,
                            task=task, **cls_overrides)
    pm_dir = os.path.join(output_dir, "pseudo_masks")
    pm_datalist = os.path.join(pm_dir, "datalist.json")
    if not os.path.exists(pm_datalist):
        build_pseudo_masks(cls_bundle, erasing_dir, pm_dir, bg_threshold=bg_threshold, configs=cls_configs,
                           **{k: v for k, v in cls_overrides.items()})
    runs = {}
    for variant in variants:
        if variant not in ("psl", "psl_sec"):
            raise ValueError(f"variants are psl and psl_sec, got {variant!r}")
        out = os.path.join(output_dir, variant)
        done = os.path.join(out, "done.json")
        run = {**seg_overrides, "sec": variant == "psl_sec"}
        if not os.path.exists(done):
            run_bundle(seg_bundle, seg_configs, datalist=pm_datalist, datalist_task=None, output_dir=out,
                       register_model=False, **run)
            with open(done, "w") as f:
                json.dump({"settings": run}, f, default=str)
        runs[variant] = out
    table = localisation_table(cls_bundle, seg_bundle, output_dir, pm_datalist, erasing_dir, runs, cls_configs,
                               seg_configs, q, delta, cls_overrides, seg_overrides, overlays)
    logger.info("AE-PSL localisation:\n%s", localization_table_md(table))
    return table
