"""ISNet on COVID severity (issue 13): does keeping the relevance inside the lungs change what the model reads?

:func:`severity_guidance_experiment` trains the covid_severity bundle once per method (:func:`~cutremain_monai.engines.methods.method_overrides`) with
the same seed and settings, evaluates the test section with the bundle's own ``evaluate.yaml`` (the checkpoint
ensemble; ``test_metrics.json``), and measures, with the best-on-validation model, the share of the LRP relevance
``|R|`` of the zone logits' sum that lies outside the lung mask on the test images (:func:`outside_lung_share`;
what ISNet's loss pushes down; lower: the model reads the lungs). Writes ``severity_guidance.md`` / ``.csv``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from cutremain_monai.engines.bundle import bundle_parser, load_network, run_bundle
from cutremain_monai.engines.methods import method_overrides
from cutremain_monai.io.datalist import load_datalist
from cutremain_monai.localization.lrp import make_lrp_ready, outside_share, severity_relevance
from cutremain_monai.metrics.comparison import bootstrap_mean_ci

__all__ = ["outside_lung_share", "severity_guidance_experiment"]

logger = logging.getLogger(__name__)


def outside_lung_share(model: torch.nn.Module, x: torch.Tensor, lung_mask: torch.Tensor, zones: torch.Tensor,
                       batch: int = 8) -> np.ndarray:
    """Per image, ``sum |R| outside the lungs / sum |R|`` of the LRP map (LRP-Flex, z^B at the first convolution
    with each batch's bounds, model in eval mode) of the sum of the six zone logits of a
    :class:`~cutremain_monai.networks.SeverityViT`."""
    model = make_lrp_ready(model).eval()
    out = []
    for i in range(0, len(x), batch):
        xb, mb, zb = x[i : i + batch], lung_mask[i : i + batch], zones[i : i + batch]
        out.append(outside_share(severity_relevance(model, xb, mb, zb), mb).numpy())
    return np.concatenate(out)


def severity_guidance_experiment(bundle: str, datalist: str, output_dir: str, methods: Sequence[str] = ("none", "isnet"),
                                 task: str | None = None, configs: Sequence[str] = ("train.yaml", "cpu.yaml"),
                                 **overrides) -> list[dict]:
    """Train, evaluate and score each guidance (see the module docstring); returns the table's rows."""
    for m in methods:
        method_overrides(m, augmentation=False)
    settings = {"register_model": False, "overlays": 0, "datalist": os.path.abspath(datalist), "datalist_task": task,
                **overrides}
    parser = bundle_parser(bundle, list(configs), **settings)
    chain = parser.get_parsed_content("preprocessing")
    samples = []
    for it in load_datalist(settings["datalist"], "test", task=task):
        try:
            samples.append(chain(dict(it)))
        except Exception as e:  # unreadable: named and left out (the evaluation sets it aside the same way)
            logger.warning("severity guidance: %s left out of the relevance share (%s: %s)", it.get("image"), type(e).__name__, e)
    x = torch.stack([torch.as_tensor(s["image"]).float() for s in samples])
    mask = torch.stack([torch.as_tensor(s["lung_mask"]).float() for s in samples])
    zones = torch.stack([torch.as_tensor(s["zones"]).round().to(torch.uint8) for s in samples])
    rows = []
    for m in methods:
        out = os.path.abspath(os.path.join(output_dir, m))
        logger.info("severity guidance: training %s", m)
        run = {**settings, **method_overrides(m, augmentation=False)}
        run_bundle(bundle, list(configs), output_dir=out, run_name=f"severity_guidance_{m}", **run)
        run_bundle(bundle, [*configs, "evaluate.yaml"], output_dir=out, **run)
        with open(os.path.join(out, "test_metrics.json")) as f:
            test = json.load(f)
        model = load_network(parser, os.path.join(out, "checkpoints", "model.pt"))
        share, low, high = bootstrap_mean_ci(outside_lung_share(model, x, mask, zones))
        rows.append({"guidance": m, "n_test": test["n"], "n_relevance": len(samples), "mse": test["mse"], "mae": test["mae"], "pearson": test["pearson"],
                     "mean_zone_auc": test["mean_zone_auc"], "outside_lung_relevance": share,
                     "outside_lung_low": low, "outside_lung_high": high})
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "severity_guidance.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| guidance | n test | global MSE | MAE | Pearson | mean zone AUC | LRP relevance outside the lungs (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['guidance']} | {r['n_test']} | {r['mse']:.3f} | {r['mae']:.3f} | {r['pearson']:.3f} | {r['mean_zone_auc']:.3f} | "
              f"{r['outside_lung_relevance']:.3f} ({r['outside_lung_low']:.3f}-{r['outside_lung_high']:.3f}) |" for r in rows]
    with open(os.path.join(output_dir, "severity_guidance.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows
