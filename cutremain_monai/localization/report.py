"""The map side of a localisation report: for each boxed positive sample of a datalist section, the class to
explain, the sample through the bundle's chain, the maps of several methods at the native sample size, and the
side-by-side overlays. Scoring the maps is :func:`cutremain_monai.metrics.localization.score_maps`; the report that
writes both (``cutremain localize`` and the bundles' ``LocalizationReport``) is
:func:`cutremain_monai.handlers.localization_report.localize_items`.

Each image goes through the bundle's own chain in two parts, ``load_transforms`` (native resolution: halves, boxes
in their pixels) and ``final_transforms`` (the model's input size); maps are computed at the model's size and
brought back to the native sample size (bilinear) before scoring against the native boxes, so no box is rounded to
a coarse grid. Only positive samples with a lesion box are scored, for the class they are positive for (binary:
the one logit; multi-class: the labelled class; multi-label: the class named by the first lesion box, else the
first positive class).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cutremain_monai.localization.cam import cam, overlay_image
from cutremain_monai.localization.grad_cam import DEFAULT_LAYER, grad_cam
from cutremain_monai.localization.lrp import lrp
from cutremain_monai.localization.normalise import as_array, normalise_map
from cutremain_monai.localization.targetness import targetness_map

__all__ = ["MAP_METHODS", "check_map_methods", "compute_map", "positive_classes", "explained_class", "lesion_boxes",
           "scored_cases", "upsample_map", "case_maps", "write_overlays", "positive_class_maps"]

logger = logging.getLogger(__name__)
MAP_METHODS = ("cam", "gradcam", "gradcam_pp", "lrp", "targetness", "psl")


def check_map_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` as a list when every one is a map kind of :data:`MAP_METHODS`, else a ``ValueError`` naming it."""
    for method in methods:
        if method not in MAP_METHODS:
            raise ValueError(f"unknown localisation method {method!r}; choose from {', '.join(MAP_METHODS)}")
    return list(methods)


def compute_map(method: str, model: torch.nn.Module, x: torch.Tensor, target: int, layer: str | None = None,
                bounds=None, **kwargs) -> torch.Tensor:
    """Raw ``(B, 1, H, W)`` map of ``method`` for class ``target`` at the input's size (not normalised).
    ``"targetness"``: ``model`` is a background-learning patch classifier (``target`` unused) and ``kwargs`` go to
    :func:`~cutremain_monai.localization.targetness.targetness_map` (``window``, ``stride``, ...). ``"psl"``: ``model`` is a
    :class:`~cutremain_monai.networks.psl.PSLNet`; the map is its class-weighted probability of ``target``."""
    if method == "psl":  # a lesion-segmentation network: its class-weighted probability of class `target`
        return model(x)[:, target + 1 : target + 2].float()
    if method == "targetness":
        return targetness_map(model, x, **kwargs)
    if method == "cam":
        return cam(model, x, target=target, normalise=False)
    if method in ("gradcam", "gradcam_pp"):
        return grad_cam(model, x, target=target, layer=layer or DEFAULT_LAYER, plus_plus=method == "gradcam_pp",
                        normalise=False)
    if method == "lrp":
        return lrp(model, x, target=target, bounds=bounds)
    raise ValueError(f"unknown localisation method {method!r}; choose from {', '.join(MAP_METHODS)}")


def positive_classes(label, label_mode: str) -> list[int]:
    """The classes whose CAM is mined for a sample: binary -> [0] (the one logit) when positive; multi-class ->
    the labelled class unless it is class 0 (normal); multi-label -> every positive class."""
    y = as_array(label).reshape(-1)
    if label_mode == "binary":
        return [0] if y.size and y[0] > 0.5 else []
    if label_mode == "multiclass":
        c = int(y.argmax()) if y.size > 1 else int(y[0])
        return [c] if c != 0 else []
    return [int(i) for i in np.flatnonzero(y > 0.5)]


def explained_class(sample: dict, label_mode: str, class_names: Sequence[str], lesion_labels) -> int | None:
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


def lesion_boxes(sample: dict, lesion_labels) -> np.ndarray:
    """The sample's boxes ``(N, 4)`` whose label is a lesion label (all of them when ``lesion_labels`` is None)."""
    boxes = np.asarray(sample.get("boxes", []), dtype=np.float64).reshape(-1, 4)
    labels = list(sample.get("box_labels") or [None] * len(boxes))
    keep = [i for i, lab in enumerate(labels) if lesion_labels is None or lab in lesion_labels]
    return boxes[keep]


def scored_cases(items, load: Callable, final: Callable, label_mode, class_names, lesion_labels) -> Iterator[tuple]:
    """(name, native image (H, W), native boxes, model input (1, h, w), target) per scored sample."""
    for it in items:
        try:
            samples = load(dict(it))
        except Exception as e:  # an unreadable image is named and left out, never ends the report
            logger.warning("localisation: %s set aside (%s: %s)", it.get("image"), type(e).__name__, e)
            continue
        for s in samples if isinstance(samples, list) else [samples]:
            boxes = lesion_boxes(s, lesion_labels)
            target = explained_class(s, label_mode, class_names, lesion_labels)
            if target is None or len(boxes) == 0:
                continue
            native = torch.as_tensor(s["image"]).float()
            x = final(dict(s))
            x = x[0] if isinstance(x, list) else x
            name = os.path.basename(str(it["image"])) + (f"#{s['half']}" if s.get("half") else "")
            yield name, native[0].numpy(), boxes, torch.as_tensor(x["image"]).float(), target


def upsample_map(m: torch.Tensor, size) -> np.ndarray:
    """A ``(h, w)`` map brought to ``size`` (bilinear, no corner alignment) as a numpy array."""
    return F.interpolate(m[None, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def case_maps(model, cases, methods, layer, bounds, method_kwargs=None) -> list[tuple]:
    """``(name, native, boxes, target, {method: map at the native size})`` for each case of :func:`scored_cases`."""
    device = next(model.parameters()).device
    out = []
    for name, native, boxes, x, target in cases:
        maps = {}
        for method in methods:
            m = compute_map(method, model, x[None].to(device), target, layer=layer, bounds=bounds,
                            **(method_kwargs or {}).get(method, {}))[0, 0].detach().cpu()
            maps[method] = upsample_map(m, native.shape)
        out.append((name, native, boxes, target, maps))
    return out


def write_overlays(results, methods, out_dir: str, limit: int) -> int:
    """Side-by-side overlays (one tile per method, min-max normalised maps) of the first ``limit`` results."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    for k, (name, native, boxes, _, maps) in enumerate(results[:limit]):
        tiles = []
        for method in methods:
            tiles.append(overlay_image(native, normalise_map(maps[method]), boxes.tolist(), title=method))
        w, h = sum(t.width for t in tiles), max(t.height for t in tiles)
        grid = Image.new("RGB", (w, h))
        x = 0
        for t in tiles:
            grid.paste(t, (x, 0))
            x += t.width
        grid.save(os.path.join(out_dir, f"case_{k:03d}_{name.replace('#', '_')}.png"))
    return min(limit, len(results))




def positive_class_maps(model: torch.nn.Module, sample: dict, label_mode: str, pool: str = "avgpool") -> dict[int, torch.Tensor]:
    """Raw CAM ``(h, w)`` at the model's input size (on the CPU, not normalised) of each positive class
    (:func:`positive_classes`) of a preprocessed ``sample`` (``image`` at the model's size, ``label``): one CAM
    pass for all of them. The loop that adversarial erasing mines and the PSL pseudo-masks start from."""
    classes = positive_classes(sample["label"], label_mode)
    if not classes:
        return {}
    device = next(model.parameters()).device
    x = torch.as_tensor(sample["image"]).float()[None].to(device)
    maps = cam(model, x, target=[classes[0]] if len(classes) == 1 else None, pool=pool, normalise=False)
    return {c: (maps[0, 0] if maps.shape[1] == 1 else maps[0, c]).detach().cpu() for c in classes}
