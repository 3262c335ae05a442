"""Adversarial-erasing rounds over a classification bundle (seed 002's AE region mining), run by
``cutremain experiment erase``.

Round t trains the bundle (its own configs, through :func:`~cutremain_monai.engines.bundle.run_bundle`) on the
images of round t, takes the CAM of the ground-truth class of every positive training sample (each half, for
bundles that split images) through the bundle's one preprocessing chain, marks its top ``q`` share of pixels (or
the pixels at or above ``delta`` of the min-max map), adds the region to the image's union of mined regions, and
fills the union with the training images' mean intensity (in [0, 1], :func:`dataset_mean`) for round t + 1.
Validation images stay as they are, so a falling validation AUC shows over-erasing: when a round's AUC is more than
``max_auc_drop`` below the previous round's, its regions are not used and the rounds stop.

Outputs under ``output_dir``: ``round<t>/`` (the bundle's outputs and the round's datalist), ``images/round<t>/``
(the erased training images, 16-bit PNG), ``masks/`` (the union per image, 8-bit PNG), ``mined_datalist.json`` (the
training items with the mined boxes, the largest components of the union, as ``boxes`` with ``box_labels``, and
``mined: true``; validation and test unchanged), ``erasing_rounds.csv`` / ``.md`` (AUC and mined share per
round, and why the rounds stopped) and ``erasing_settings.json`` (the fill value and the settings).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cutremain_monai.engines.bundle import bundle_parser, load_network, run_bundle, with_study_store
from cutremain_monai.io.datalist import load_datalist
from cutremain_monai.io.loader import load_xray, save_png16
from cutremain_monai.io.paths import unique_stem
from cutremain_monai.localization.erasing import erase, mined_boxes, top_region
from cutremain_monai.localization.report import positive_class_maps, positive_classes
from cutremain_monai.transforms.hide_and_seek import dataset_mean

__all__ = ["adversarial_erasing", "mined_region"]

logger = logging.getLogger(__name__)


def mined_region(item: dict, preprocess, model, label_mode: str, q: float, delta: float | None, layer_pool: str,
                 shape: tuple[int, int]) -> np.ndarray:
    """The round's mined region of one image at its native size (union over its positive samples and classes)."""
    samples = preprocess(dict(item))
    samples = samples if isinstance(samples, list) else [samples]
    h, w = shape
    region = np.zeros((h, w), dtype=bool)
    for s in samples:
        x0, x1 = {"left": (0, w // 2), "right": (w // 2, w)}.get(s.get("half"), (0, w))
        for m in positive_class_maps(model, s, label_mode, pool=layer_pool).values():
            r = top_region(m, q=q, delta=delta)
            r = F.interpolate(torch.as_tensor(r, dtype=torch.float32)[None, None], size=(h, x1 - x0), mode="nearest")[0, 0]
            region[:, x0:x1] |= r.numpy() > 0.5
    return region


def adversarial_erasing(bundle: str, datalist: str, output_dir: str, rounds: int = 3, q: float = 0.2,
                        delta: float | None = None, max_auc_drop: float = 0.05, configs: Sequence[str] = ("train.yaml", "cpu.yaml"),
                        task: str | None = None, max_boxes: int = 1, min_area: int = 4, box_label=None,
                        pool: str = "avgpool", **overrides) -> list[dict]:
    """Run the rounds (module doc); returns one row per round trained: ``round``, ``val_auc``, ``mined_share``
    (mean share of a positive image's pixels in the union after the round), ``used`` and ``note``."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    os.makedirs(output_dir, exist_ok=True)
    sections = {s: load_datalist(datalist, s, task=task) for s in ("training", "validation", "test")}
    originals = sections["training"]
    settings = with_study_store(output_dir, {"augmentation": "none", "register_model": False, "cam_images": 0,
                                             **overrides})
    parser0 = bundle_parser(bundle, configs, **settings)
    label_mode = parser0.get_parsed_content("label_mode")
    class_names = parser0.get_parsed_content("class_names")
    fill = dataset_mean(originals)
    logger.info("erasing fill value (training mean in [0, 1]): %.4f", fill)
    with open(os.path.join(output_dir, "erasing_settings.json"), "w") as f:  # what later steps must match
        json.dump({"fill": fill, "rounds": rounds, "q": q, "delta": delta, "max_auc_drop": max_auc_drop, "pool": pool,
                   "configs": list(configs), "overrides": settings}, f, indent=1, default=str)
    seen: dict = {}
    stems = [unique_stem(it["image"], seen) for it in originals]
    union: dict[int, np.ndarray] = {}
    current = [dict(it) for it in originals]
    rows, prev_auc = [], None
    for t in range(1, rounds + 1):
        rdir = os.path.join(output_dir, f"round{t}")
        dl = os.path.join(rdir, "datalist.json")
        os.makedirs(rdir, exist_ok=True)
        with open(dl, "w") as f:
            json.dump({"training": current, "validation": sections["validation"], "test": sections["test"]}, f)
        out = os.path.join(rdir, "bundle")
        run_bundle(bundle, configs, datalist=dl, datalist_task=None, output_dir=out, **settings)
        with open(os.path.join(out, "val_metrics.json")) as f:
            auc = float(json.load(f)["auc"])
        row = {"round": t, "val_auc": round(auc, 4), "used": True, "note": ""}
        if prev_auc is not None and auc < prev_auc - max_auc_drop:
            row.update(used=False, note=f"validation AUC fell by {prev_auc - auc:.3f} > {max_auc_drop}: over-erased, stopped")
            row["mined_share"] = rows[-1]["mined_share"] if rows else 0.0
            rows.append(row)
            logger.info("erasing round %d: %s", t, row["note"])
            break
        parser = bundle_parser(bundle, configs, **{**settings, "output_dir": out})
        preprocess = parser.get_parsed_content("preprocessing")
        model = load_network(parser)
        shares = []
        nxt = []
        for i, (orig, it) in enumerate(zip(originals, current)):
            if not positive_classes(orig.get("label", 0), label_mode):  # erase positives only
                nxt.append(it)
                continue
            image = load_xray(orig["image"]).numpy()[0]
            region = mined_region(it, preprocess, model, label_mode, q, delta, pool, image.shape)
            if region.any() or i in union:
                union[i] = union.get(i, np.zeros(image.shape, dtype=bool)) | region
            if i not in union:
                nxt.append(it)
                continue
            shares.append(float(union[i].mean()))
            path = save_png16(os.path.join(output_dir, "images", f"round{t + 1}", stems[i] + ".png"), erase(image, union[i], fill))
            nxt.append({**it, "image": path})
        row["mined_share"] = round(float(np.mean(shares)), 4) if shares else 0.0
        rows.append(row)
        logger.info("erasing round %d: val AUC %.3f, mined share %.3f", t, auc, row["mined_share"])
        prev_auc, current = auc, nxt
    _write_outputs(output_dir, originals, stems, union, sections, rows, max_boxes, min_area,
                   box_label if box_label is not None else (class_names[0] if label_mode == "binary" else "mined"))
    return rows


def _write_outputs(output_dir, originals, stems, union, sections, rows, max_boxes, min_area, box_label) -> None:
    from PIL import Image

    mined = []
    for i, it in enumerate(originals):
        if i not in union:
            mined.append(dict(it))
            continue
        path = os.path.join(output_dir, "masks", stems[i] + ".png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(union[i].astype(np.uint8) * 255).save(path)
        boxes = mined_boxes(union[i], max_boxes=max_boxes, min_area=min_area)
        mined.append({**it, "boxes": boxes.tolist(), "box_labels": [box_label] * len(boxes), "mined": True,
                      "mined_mask": path})
    with open(os.path.join(output_dir, "mined_datalist.json"), "w") as f:
        json.dump({"training": mined, "validation": sections["validation"], "test": sections["test"]}, f, indent=1)
    with open(os.path.join(output_dir, "erasing_rounds.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["round", "val_auc", "mined_share", "used", "note"])
        w.writeheader()
        w.writerows(rows)
    lines = ["| round | validation AUC | mined share of a positive image | used | note |", "|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['val_auc']:.3f} | {r['mined_share']:.3f} | {'yes' if r['used'] else 'no'} | {r['note']} |"
              for r in rows]
    with open(os.path.join(output_dir, "erasing_rounds.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
