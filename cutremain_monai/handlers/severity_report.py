"""Evaluator handler for the COVID severity model: global-score MSE / MAE / Pearson / R² and mean zone AUC over the
whole (distributed) evaluation set, beside the same figures between the two raters on the same images, and
lesion-map overlays with the zone grid.

Writes ``{prefix}_metrics.json`` (model, per-zone AUC, rater agreement) and ``{prefix}_severity_table.md`` every
epoch on rank 0, and, when the mean zone AUC improves, overlays of the first ``overlays`` samples of ``dataset``
under ``{prefix}_overlays/`` (the best checkpoint's maps during training; the evaluated model's on test).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from ignite.engine import Engine, Events

from cutremain_monai.handlers.utils import gather_all, rank
from cutremain_monai.localization.cam import save_overlay
from cutremain_monai.localization.lrp import make_lrp_ready, outside_share, severity_relevance
from cutremain_monai.localization.severity_overlay import save_severity_overlay
from cutremain_monai.metrics.severity import beats_baselines, rater_agreement, severity_metrics, severity_table
from cutremain_monai.metrics.severity_baselines import severity_baselines

__all__ = ["SeverityReport"]

logger = logging.getLogger(__name__)


class SeverityReport:
    """Args:
        output_dir / prefix: where and under which name (``val`` / ``test``) the report goes.
        items: the evaluated datalist items (for the rater comparison: ``zone_scores`` vs ``zone_scores_other``).
        network / dataset / overlays: draw overlays of that many dataset samples with this network (0: none).
        relevance: also draw the LRP relevance of the zone logits (what ISNet trains; the first ensemble member)
            over the whole image, with the share outside the lungs, under ``{prefix}_relevance_overlays/``.
        baseline_items / baseline_transform: the training items and the preprocessing chain: the constant and
            zone-intensity baselines (:mod:`cutremain_monai.metrics.severity_baselines`) are fitted on them once
            and scored on ``items`` beside the model (rows of the table, ``baselines`` in the JSON).
    """
    def __init__(self, output_dir: str, prefix: str = "val", items: list | None = None, network=None, dataset=None,
                 overlays: int = 8, pred_key: str = "pred", label_key: str = "label", relevance: bool = False,
                 baseline_items: list | None = None, baseline_transform=None):
        self.output_dir, self.prefix = output_dir, prefix
        self.items = items or []
        self.network, self.dataset, self.overlays = network, dataset, overlays
        self.pred_key, self.label_key = pred_key, label_key
        self.relevance = relevance
        self.baseline_items, self.baseline_transform = baseline_items, baseline_transform
        self.baselines: dict | None = None
        self.best = -np.inf
        self._p: list = []
        self._y: list = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: (self._p.clear(), self._y.clear()))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        for o in out if isinstance(out, list) else [out]:
            p = o[self.pred_key]
            p = p[0] if isinstance(p, (tuple, list)) else p
            self._p.append(torch.as_tensor(p).detach().float().reshape(1, -1).cpu())
            self._y.append(torch.as_tensor(o[self.label_key]).detach().float().reshape(1, -1).cpu())

    def __call__(self, engine: Engine) -> None:
        if not self._p:
            return
        p, y = gather_all(torch.cat(self._p)).numpy(), gather_all(torch.cat(self._y)).numpy()
        m = severity_metrics(y, p)
        raters = rater_agreement(self.items)
        for k in ("mse", "mae", "pearson", "r2", "mean_zone_auc"):
            engine.state.metrics[f"{self.prefix}_{k}"] = m[k]
        if rank() != 0:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        baselines = self._baselines()
        with open(os.path.join(self.output_dir, f"{self.prefix}_metrics.json"), "w") as f:
            json.dump({**m, "raters": raters, "baselines": baselines,
                       "beats_baselines": beats_baselines(m, baselines) if baselines else None}, f, indent=1)
        with open(os.path.join(self.output_dir, f"{self.prefix}_severity_table.md"), "w") as f:
            f.write(severity_table(m, raters, baselines=baselines))
        score = m["mean_zone_auc"] if np.isfinite(m["mean_zone_auc"]) else -m["mse"]
        if score > self.best:
            self.best = score
            self.draw()

    def _baselines(self) -> dict | None:
        if self.baselines is None and self.baseline_items and self.baseline_transform is not None:
            out = severity_baselines(self.baseline_items, self.items, self.baseline_transform)
            self.baselines = {k: v for k, v in out.items() if k != "n_train"}
        return self.baselines

    def draw(self) -> int:
        if not self.overlays or self.network is None or self.dataset is None:
            return 0
        net = self.network.module if hasattr(self.network, "module") else self.network
        if hasattr(net, "members"):  # a checkpoint ensemble: average the members' maps
            members = list(net.members)
        else:
            members = [net]
        device = next(members[0].parameters()).device
        n, explainer = 0, None
        for i in range(min(self.overlays, len(self.dataset))):
            s = self.dataset[i]
            x = torch.as_tensor(s["image"]).float()[None].to(device)
            mask = torch.as_tensor(s["lung_mask"]).float()[None].to(device)
            zones = torch.as_tensor(s["zones"]).to(torch.uint8)[None].to(device)
            with torch.no_grad():
                maps = torch.stack([m.eval().masked_map(x, mask) for m in members]).mean(0)
                probs = members[0].pool(maps, zones)
            labels = s.get("zone_scores")
            save_severity_overlay(os.path.join(self.output_dir, f"{self.prefix}_overlays", f"overlay_{i:03d}.png"),
                                  s["image"][0], maps[0, 0].cpu(), s["zones"][0], probs[0].cpu(), labels,
                                  title=f"global {float(probs.sum()):.1f}" + (f" / ref {int(np.sum(labels))}" if labels is not None else ""))
            if self.relevance:
                if explainer is None:  # one LRP-ready copy per drawing, not per image

                    explainer = make_lrp_ready(members[0]).eval()
                self._draw_relevance(explainer, x, mask, zones, s["image"][0], i)
            n += 1
        return n

    def _draw_relevance(self, model, x, mask, zones, image, i: int) -> None:
        relevance = severity_relevance(model, x, mask, zones).detach()
        outside = float(outside_share(relevance, mask)[0])
        heat = relevance.abs()[0, 0].cpu()
        save_overlay(os.path.join(self.output_dir, f"{self.prefix}_relevance_overlays", f"relevance_{i:03d}.png"), image,
                     heat / heat.max().clamp_min(1e-12), title=f"|LRP| of the zone logits: {outside:.0%} outside the lungs")
