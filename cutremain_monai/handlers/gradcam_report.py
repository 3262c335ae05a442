"""Trainer handler: at the end of training, Grad-CAM (or, with ``method="lrp"``, the LRP map that ISNet trains) on
validation samples that have boxes: overlay PNGs with the ground-truth boxes drawn, and the mean share of the map's
non-negative energy inside the boxes (``cam_energy_in_box``), written to ``cam_report.json`` and
``engine.state.metrics``. Rank 0 only. The best checkpoint is used when given."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from ignite.engine import Engine, Events

from cutremain_monai.handlers.utils import best_model, rank
from cutremain_monai.localization.cam import save_overlay
from cutremain_monai.metrics.localization import energy_in_mask
from cutremain_monai.localization.grad_cam import grad_cam
from cutremain_monai.localization.lrp import lrp

__all__ = ["GradCAMReport"]


class GradCAMReport:
    def __init__(self, network: torch.nn.Module, dataset, output_dir: str, checkpoint: str | None = None,
                 target_layer: str = "layer3", max_images: int = 16, device=None, enabled: bool = True,
                 label_mode: str = "binary", class_names=None, method: str = "gradcam", bounds=(0.0, 1.0)):
        if method not in ("gradcam", "lrp"):
            raise ValueError(f"method must be 'gradcam' or 'lrp', got {method!r}")
        self.method = method
        self.bounds = bounds
        self.network = network
        self.dataset = dataset
        self.output_dir = output_dir
        self.checkpoint = checkpoint
        self.target_layer = target_layer
        self.max_images = max_images
        self.device = device
        self.enabled = enabled
        self.label_mode = label_mode
        self.class_names = list(class_names) if class_names is not None else None
        self.result: dict = {}

    def _class(self, sample) -> int | None:
        """The class whose map is drawn: binary -> the single logit; multi-class -> the labelled class; multi-label
        -> the class named by the first box label (else the first positive label)."""
        if self.label_mode == "binary":
            return None
        y = torch.as_tensor(sample["label"]).reshape(-1)
        if self.label_mode == "multiclass":
            return int(y.argmax()) if y.numel() > 1 else int(y[0])
        names = self.class_names or []
        for lab in sample.get("box_labels", []) or []:
            if lab in names:
                return names.index(lab)
        return int(y.argmax())

    def _prob(self, logits: torch.Tensor, c: int | None) -> float:
        if self.label_mode == "multiclass":
            return float(torch.softmax(logits, 1)[0, c])
        return float(torch.sigmoid(logits).reshape(-1)[0 if c is None else c])

    def attach(self, engine: Engine) -> None:
        if self.enabled and not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def run(self) -> dict:
        model = best_model(self.network, self.checkpoint)
        device = self.device or next(model.parameters()).device
        model.to(device)
        overlay_dir = os.path.join(self.output_dir, "cam_overlays")
        energies, n = [], 0
        for i in range(len(self.dataset)):
            samples = self.dataset[i]
            for s in samples if isinstance(samples, list) else [samples]:
                mask = s.get("box_mask")
                if mask is None or float(torch.as_tensor(mask).sum()) == 0 or n >= self.max_images:
                    continue
                img = torch.as_tensor(s["image"]).float()[None].to(device)
                c = self._class(s)
                cam = self._map(model, img, c)
                e = energy_in_mask(cam, torch.as_tensor(mask)[0])
                energies.append(e)
                with torch.no_grad():
                    prob = self._prob(model(img), c)
                ys, xs = np.nonzero(np.asarray(torch.as_tensor(mask)[0]) > 0)
                box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                save_overlay(os.path.join(overlay_dir, f"cam_{n:03d}.png"), s["image"][0], cam, [box],
                             title=f"{self._title(s, c)} p={prob:.2f} in-box {e:.2f}")
                n += 1
        finite = [e for e in energies if np.isfinite(e)]
        self.result = {"cam_energy_in_box": float(np.mean(finite)) if finite else float("nan"), "images": n, "method": self.method}
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "cam_report.json"), "w") as f:
            json.dump(self.result, f, indent=1)
        return self.result

    def _map(self, model, img, c) -> torch.Tensor:
        """The map of class ``c`` (None: the single logit), non-negative, scaled to [0, 1] by its maximum."""
        if self.method == "gradcam":
            return grad_cam(model, img, target=c, layer=self.target_layer)[0, 0].cpu()
        heat = lrp(model, img, target=0 if c is None else c, bounds=self.bounds)[0, 0].detach().cpu().clamp_min(0)
        peak = float(heat.max())
        return heat / peak if peak > 0 else heat

    def _title(self, s, c) -> str:
        if c is None:
            return f"y={float(torch.as_tensor(s['label']).reshape(-1)[0]):.0f}"
        return f"{self.class_names[c] if self.class_names else c}"

    def __call__(self, engine: Engine) -> None:
        if not self.enabled or rank() != 0:
            return
        self.run()
        engine.state.metrics["cam_energy_in_box"] = self.result["cam_energy_in_box"]
