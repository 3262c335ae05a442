"""The shortcut test (issue 13): does a method make the classifier read the lesion rather than a burned-in tag?

:func:`~cutremain_monai.data.phantoms.generate_shortcut_samples` writes clavicle phantoms whose letter tag marks
every positive image of the training and validation sections and is independent of the label in the test
section. :func:`shortcut_experiment` trains the clavicle bundle once per method with the same seed and settings
(whole images, no halves), then scores two checkpoints: the best on validation (what the bundle keeps as
``model.pt``; the validation set carries the same tag, so it rewards reading it) and the last epoch's. Scores: validation
and test AUC (with a bootstrap 95% interval on test), the AUC of the test predictions against the TAG's presence
(1.0: the network reads the tag; 0.5: it ignores it), and the share of the map's non-negative energy on the tag
(test images that carry it) and in the lesion box (positive test images), for Grad-CAM and LRP.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from cutremain_monai.data.phantoms import generate_shortcut_samples
from cutremain_monai.engines.bundle import bundle_parser, load_network, with_study_store
from cutremain_monai.engines.methods import method_overrides
from cutremain_monai.experiments.cross_validation import train_and_test
from cutremain_monai.handlers.reproducibility import latest_checkpoint
from cutremain_monai.io.datalist import load_datalist
from cutremain_monai.localization.report import compute_map
from cutremain_monai.metrics.classification import auc_ci, mean_auc
from cutremain_monai.metrics.localization import energy_in_box

__all__ = ["shortcut_experiment", "score_shortcut", "shortcut_table"]

logger = logging.getLogger(__name__)


def score_shortcut(bundle: str, datalist: str, checkpoints: dict, **overrides) -> dict:
    """Scores of each trained model (``{name: checkpoint path}``) on the shortcut datalist (see the module
    docstring): ``{name: scores}``. The bundle is parsed and the images preprocessed once for all of them."""
    parser = bundle_parser(bundle, ["train.yaml", "cpu.yaml"], datalist=datalist, **overrides)
    chain = parser.get_parsed_content("preprocessing")
    loader = next(t for t in chain.transforms if type(t).__name__ == "LoadXrayd")
    layer = parser.get_parsed_content("cam_layer")
    data = {}
    for section in ("validation", "test"):
        items = load_datalist(datalist, section, task="shortcut")
        x = torch.stack([torch.as_tensor(chain(dict(it))["image"]).float() for it in items])
        data[section] = (items, x, np.asarray([int(it["label"]) for it in items]))
    items, x, y = data["test"]
    stored = tuple(np.asarray(loader(dict(items[0]))["image"]).shape[-2:])
    if stored != tuple(x.shape[-2:]):  # boxes are in stored pixels: the experiment keeps the stored size
        raise ValueError(f"the shortcut test scores maps at the stored size {stored}; image_size is {tuple(x.shape[-2:])}")
    marked = np.asarray([bool(it["marker"]) for it in items])
    pos = y == 1
    tag_boxes = [[it["marker_box"]] for it, m in zip(items, marked) if m]
    lesion_boxes = [[b for b, lab in zip(it["boxes"], it["box_labels"]) if lab == "fracture"] for it, p in zip(items, pos) if p]
    results = {}
    for name, checkpoint in checkpoints.items():
        model = load_network(parser, checkpoint)
        with torch.no_grad():
            prob = {s: torch.sigmoid(model(xs)).reshape(-1).numpy() for s, (_, xs, _) in data.items()}
        auc, low, high = auc_ci(y, prob["test"])
        out = {"validation_auc": mean_auc(data["validation"][2], prob["validation"]), "test_auc": auc,
               "test_auc_low": low, "test_auc_high": high,
               "tag_auc": mean_auc(marked, prob["test"])}  # how well the prediction tells the tag's presence
        for method in ("gradcam", "lrp"):
            maps = torch.cat([compute_map(method, model, x[i : i + 8], target=0, layer=layer, bounds=(0.0, 1.0)).detach()
                              for i in range(0, len(x), 8)])
            out[f"{method}_tag_energy"] = energy_in_box(maps[marked], tag_boxes)["mean"]
            out[f"{method}_lesion_energy"] = energy_in_box(maps[pos], lesion_boxes)["mean"]
        results[name] = out
    return results


def shortcut_experiment(bundle: str, output_dir: str, methods: Sequence[str] = ("none", "cut_remain", "sup_cutout", "gain", "isnet"),
                        n: int = 200, size: int = 128, epochs: int = 20, warmup_epochs: int = 5, seed: int = 0,
                        data_dir: str | None = None, **overrides) -> list[dict]:
    """Generate the shortcut set (once, under ``data_dir`` or ``output_dir/data``), train and score every method;
    writes ``shortcut_results.csv`` / ``shortcut_table.md`` under ``output_dir`` and returns the rows."""
    for m in methods:
        method_overrides(m)
    data_dir = os.path.abspath(data_dir or os.path.join(output_dir, "data"))
    datalist = os.path.join(data_dir, "datalist.json")
    if not os.path.exists(datalist):
        generate_shortcut_samples(data_dir, n=n, seed=seed, size=size)
    defaults = dict(split_halves=False, image_size=[size, size], epochs=epochs, guidance_warmup_epochs=warmup_epochs,
                    seed=seed, num_copies=2, register_model=False, cam_images=0, localization_report=False,
                    experiment_name="shortcut")
    settings = with_study_store(output_dir, {**defaults, **overrides})
    rows = []
    for m in methods:
        out = os.path.abspath(os.path.join(output_dir, m.replace("+", "_")))
        logger.info("shortcut test: training %s", m)
        train_and_test(bundle, datalist, out, task="shortcut", run_name=f"shortcut_{m}",
                       **{**settings, **method_overrides(m)})
        ckpt_dir = os.path.join(out, "checkpoints")
        scores = score_shortcut(bundle, datalist, {"best val": os.path.join(ckpt_dir, "model.pt"), "last": latest_checkpoint(ckpt_dir)},
                                **{k: v for k, v in settings.items() if k in ("split_halves", "image_size", "network_depth", "cam_layer")},
                                datalist_task="shortcut", output_dir=out)
        rows.extend({"method": m, "checkpoint": which, **values} for which, values in scores.items())
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "shortcut_results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(output_dir, "shortcut_table.md"), "w") as f:
        f.write(shortcut_table(rows))
    with open(os.path.join(output_dir, "shortcut_settings.json"), "w") as f:
        json.dump({"n": n, "size": size, "methods": list(methods), **settings}, f, indent=1)
    return rows


def shortcut_table(rows: list[dict]) -> str:
    lines = ["| method | checkpoint | val AUC | test AUC (95% CI) | AUC vs tag | Grad-CAM on tag | LRP on tag | Grad-CAM in lesion box | LRP in lesion box |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r.get('checkpoint', '')} | {r['validation_auc']:.3f} | {r['test_auc']:.3f} ({r['test_auc_low']:.3f}-{r['test_auc_high']:.3f}) "
                     f"| {r['tag_auc']:.3f} | {r['gradcam_tag_energy']:.3f} | {r['lrp_tag_energy']:.3f} "
                     f"| {r['gradcam_lesion_energy']:.3f} | {r['lrp_lesion_energy']:.3f} |")
    return "\n".join(lines) + "\n"
