"""Adversarial-erasing region mining (AE, Wei et al. CVPR 2017; seed 002's AE-PSL): the pieces of one round.

A classifier trained on the images of round t gives a class activation map of the ground-truth class; its most
activated region is marked (the top ``q`` share of pixels of the min-max normalised map, or the pixels at or above
``delta``), erased (filled with the training images' mean intensity) for round t + 1, and added to the union of
the regions mined so far. After the last round the union is the mined object region; its largest connected
components, boxed, become ``boxes`` that Cut&Remain can use on images nobody annotated.

What this adds to MONAI / scikit-image (``label``, ``regionprops``): the AE-specific rules (top-q with ties kept
whole, per-map normalisation, erasing with a fill value, union bookkeeping, boxes of the largest components in the
project's xyxy pixel-edge convention). The rounds themselves (training the bundle each round, early stopping on the
validation AUC) are :func:`cutremain_monai.experiments.erasing.adversarial_erasing`.
"""

from __future__ import annotations

import numpy as np
import torch

from cutremain_monai.localization.normalise import as_array, normalise_map

__all__ = ["top_region", "erase", "mined_boxes"]


def _normalised(cam) -> np.ndarray:
    a = as_array(cam).squeeze()
    if a.ndim != 2:
        raise ValueError(f"a map must be (H, W) (or (1, H, W)), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("the map holds NaN or inf")
    return normalise_map(a)


def top_region(cam, q: float = 0.2, delta: float | None = None) -> np.ndarray:
    """Boolean ``(H, W)`` region of a map: with ``delta``, the pixels of the min-max normalised map at or above it;
    otherwise the top ``q`` share of pixels (the value of the ``ceil(q * H * W)``-th largest pixel and every pixel
    equal to it, so ties are not split arbitrarily). A constant map has no region (nothing stands out)."""
    a = _normalised(cam)
    if a.max() <= 0:
        return np.zeros(a.shape, dtype=bool)
    if delta is not None:
        if not 0 <= delta <= 1:
            raise ValueError(f"delta must be in [0, 1], got {delta}")
        return a >= delta
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q}")
    k = int(np.ceil(q * a.size))
    cut = np.partition(a.ravel(), a.size - k)[a.size - k]
    return a >= cut


def erase(image, region, fill: float):
    """``image`` (C, H, W) with the pixels of ``region`` (H, W) set to ``fill`` (a copy; tensor or array)."""
    mask = np.asarray(region, dtype=bool)
    if isinstance(image, torch.Tensor):
        out = image.clone()
        out[..., torch.as_tensor(mask)] = fill
        return out
    out = np.array(image, copy=True)
    out[..., mask] = fill
    return out


def mined_boxes(region, max_boxes: int = 1, min_area: int = 1) -> np.ndarray:
    """Boxes ``(N, 4)`` xyxy (pixel edges: a component over columns c0..c1 gives x0 = c0, x1 = c1 + 1) of the
    ``max_boxes`` largest 8-connected components of ``region`` with at least ``min_area`` pixels, largest first."""
    from skimage.measure import label, regionprops

    mask = np.asarray(region, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"region must be (H, W), got shape {mask.shape}")
    props = [p for p in regionprops(label(mask, connectivity=2)) if p.area >= min_area]
    props.sort(key=lambda p: (-p.area, p.bbox))
    boxes = [[p.bbox[1], p.bbox[0], p.bbox[3], p.bbox[2]] for p in props[:max_boxes]]
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
