"""``cutremain localize``: the localisation report (:func:`cutremain_monai.handlers.localization_report.localize_items`)
of a bundle's network with a given checkpoint on one section of a datalist, Loc. Acc.'s threshold chosen on
another section (validation by default)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from monai.transforms import Compose

from cutremain_monai.engines.bundle import bundle_parser, load_network
from cutremain_monai.handlers.localization_report import localize_items
from cutremain_monai.io.datalist import load_datalist

__all__ = ["localize"]


def localize(bundle: str, checkpoint: str, datalist: str, output_dir: str, section: str = "test",
             methods: Sequence[str] = ("cam", "gradcam", "lrp"), configs: Sequence[str] = ("train.yaml", "cpu.yaml"),
             task: str | None = None, tau_section: str | None = "validation", tracking_uri: str | None = None,
             overlays: int = 16, bounds=(0.0, 1.0), **overrides) -> dict:
    """``cutremain localize``: the bundle's network with ``checkpoint`` on ``section`` of ``datalist``. ``bounds``:
    the input range for LRP's z^B rule (the classification bundles feed [0, 1] images)."""
    parser = bundle_parser(bundle, configs, **overrides)
    model = load_network(parser, checkpoint)
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
