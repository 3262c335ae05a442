"""Evaluator handler: at the end of an evaluation, the localisation table of the evaluated model (CAM, Grad-CAM,
LRP... scored against the boxes) for the evaluated images, through the same code as ``cutremain localize``
(:func:`cutremain_monai.engines.localize.localize_items`), so the bundle's ``evaluate.yaml`` and the command give
the same numbers. Loc. Acc.'s threshold comes from ``val_items`` (the validation section), never from the images
reported. Rank 0 only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose

from cutremain_monai.handlers.utils import rank

__all__ = ["LocalizationReport"]


class LocalizationReport:
    def __init__(self, network: torch.nn.Module, items: Sequence[dict], load_transforms, final_transforms, output_dir: str,
                 methods: Sequence[str] = ("cam", "gradcam", "lrp"), label_mode: str = "binary", class_names=(),
                 lesion_box_labels=None, prefix: str = "test", val_items: Sequence[dict] | None = None, overlays: int = 8,
                 layer: str | None = None, bounds=(0.0, 1.0), enabled: bool = True, method_kwargs: dict | None = None):
        self.network, self.items, self.val_items = network, list(items), list(val_items or [])
        self.load, self.final = Compose(list(load_transforms)), Compose(list(final_transforms))
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
        from cutremain_monai.engines.localize import localize_items

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
