"""Pseudo-masks for lesion segmentation from image labels (seed 002's AE-PSL; ../shared/METHODS.md section 3).

A pseudo-mask is a label map: 0 background, ``c + 1`` class ``c``, :data:`IGNORE` (255) where nothing is known.

:func:`pseudo_mask`, for one image:

- an image without any positive class is background everywhere (its label says there is no lesion);
- otherwise **background** = pixels outside the body (:func:`body_mask`) and pixels where the normalised CAM of
  every class given is below ``bg_threshold``; **class c** = the mined region of a positive class c (the erasing
  miner's union of regions) inside the body; a pixel mined for two classes, or mined but outside the body, is
  ignored ("when in doubt, mark as ignore", as the slides put it); everything else is ignored.

:func:`refresh_labels` is PSL's online update: the ignored pixels of the *initial* pseudo-mask take the network's
prediction where its class-weighted probability is at least ``confidence`` and the predicted class is background or
a positive class of the image; labelled pixels keep their initial label (the mined seeds stay seeds). Refreshing
from the initial mask each time, not from the last refresh, keeps early mistakes from compounding.

:func:`body_mask`: Otsu's threshold (scikit-image) of the image, holes filled, components below ``min_area`` of
the image dropped; on an X-ray the body is brighter than the air around it. A constant image gives the whole frame
(no evidence of air).

What this adds to scikit-image (``threshold_otsu``, ``remove_small_objects``) and scipy (``binary_fill_holes``):
the label-map rules above.
"""

from __future__ import annotations

import numpy as np
import torch

from cutremain_monai.constants import IGNORE_LABEL
from cutremain_monai.localization.normalise import normalise_map

__all__ = ["IGNORE", "body_mask", "pseudo_mask", "refresh_labels"]

IGNORE = IGNORE_LABEL


def _array(x, name: str, ndim: int | None = None) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    return a




def body_mask(image, min_area: float = 0.01) -> np.ndarray:
    """Boolean ``(H, W)`` body of an X-ray ``(H, W)`` or ``(1, H, W)`` (module doc)."""
    from scipy.ndimage import binary_fill_holes
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    a = _array(image, "image").astype(np.float64).squeeze()
    if a.ndim != 2:
        raise ValueError(f"image must be (H, W) or (1, H, W), got shape {np.shape(image)}")
    if not 0 <= min_area < 1:
        raise ValueError(f"min_area must be in [0, 1), got {min_area}")
    if float(a.max()) - float(a.min()) <= 1e-12:
        return np.ones(a.shape, dtype=bool)
    body = binary_fill_holes(a > threshold_otsu(a))
    if min_area > 0:
        body = remove_small_objects(body, max_size=max(0, int(min_area * body.size) - 1))  # drops < min_area
    return body if body.any() else np.ones(a.shape, dtype=bool)


def pseudo_mask(image_label, mined, cams=None, body=None, bg_threshold: float = 0.2) -> np.ndarray:
    """uint8 label map ``(H, W)`` (module doc).

    Args:
        image_label: ``(C,)`` image-level labels in {0, 1} (a scalar for one class).
        mined: ``(C, H, W)`` (or ``(H, W)`` for one class) boolean mined regions.
        cams: ``(C, H, W)`` / ``(H, W)`` class activation maps (normalised here, per class), or None (background
            then comes from the body mask alone).
        body: ``(H, W)`` boolean body mask, or None (the whole frame is body).
        bg_threshold: normalised CAM below which (for every class) a pixel is background.
    """
    y = _array(image_label, "image_label").astype(float).reshape(-1)
    region = _array(mined, "mined").astype(bool)
    region = region[None] if region.ndim == 2 else region
    if region.ndim != 3 or region.shape[0] != y.size:
        raise ValueError(f"mined must be (C, H, W) with C = {y.size} classes, got shape {region.shape}")
    shape = region.shape[1:]
    if not 0 <= bg_threshold <= 1:
        raise ValueError(f"bg_threshold must be in [0, 1], got {bg_threshold}")
    present = np.flatnonzero(y > 0.5)
    if present.size == 0:
        return np.zeros(shape, dtype=np.uint8)
    inside = np.ones(shape, dtype=bool) if body is None else _array(body, "body", 2).astype(bool)
    if inside.shape != shape:
        raise ValueError(f"body is {inside.shape} but the regions are {shape}")
    out = np.full(shape, IGNORE, dtype=np.uint8)
    if cams is not None:
        c = _array(cams, "cams").astype(np.float64)
        c = c[None] if c.ndim == 2 else c
        if c.shape[1:] != shape:
            raise ValueError(f"cams are {c.shape[1:]} but the regions are {shape}")
        low = np.all(np.stack([normalise_map(m) for m in c]) < bg_threshold, axis=0)
        out[low & inside] = 0
    out[~inside] = 0
    fg = region[present]
    count = fg.sum(0)
    for k, cls in enumerate(present):
        out[fg[k] & (count == 1) & inside] = cls + 1
    out[(count > 1) | ((count > 0) & ~inside)] = IGNORE
    return out


def refresh_labels(initial, probs, image_label, confidence: float = 0.9) -> np.ndarray:
    """PSL's online update of one pseudo-mask (module doc). ``initial`` ``(H, W)`` uint8; ``probs`` ``(C + 1, H, W)``
    class-weighted probabilities; ``image_label`` ``(C,)``."""
    init = _array(initial, "initial", 2).astype(np.uint8)
    p = _array(probs, "probs", 3).astype(np.float64)
    y = _array(image_label, "image_label").astype(float).reshape(-1)
    if p.shape[0] != y.size + 1 or p.shape[1:] != init.shape:
        raise ValueError(f"probs must be (C+1, H, W) = {(y.size + 1, *init.shape)}, got {p.shape}")
    if not 0 < confidence <= 1:
        raise ValueError(f"confidence must be in (0, 1], got {confidence}")
    allowed = np.zeros(p.shape[0], dtype=bool)
    allowed[0] = True
    allowed[np.flatnonzero(y > 0.5) + 1] = True
    masked = np.where(allowed[:, None, None], p, -1.0)
    arg = masked.argmax(0)
    take = (init == IGNORE) & (masked.max(0) >= confidence)
    out = init.copy()
    out[take] = arg[take].astype(np.uint8)
    return out
