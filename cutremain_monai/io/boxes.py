"""Box validation against an image: clip what is partly outside, drop what is empty or entirely outside.

Boxes are ``(N, 4)`` ``"xyxy"`` in pixel units of the stored image (x = column, y = row), continuous
coordinates whose origin is the top-left corner of the top-left pixel, so a full-image box is
``[0, 0, W, H]``. MONAI's ``box_utils.clip_boxes_to_image`` clips but cannot tell the user which file lost
which box; this module adds the warnings (naming the file) and the drop rules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

__all__ = ["as_boxes", "validate_boxes", "xywh_to_xyxy"]

logger = logging.getLogger(__name__)


def as_boxes(boxes, source: str = "boxes") -> np.ndarray:
    """``boxes`` as a float32 ``(N, 4)`` array; ``ValueError`` naming ``source`` for any other shape."""
    arr = np.asarray(boxes if boxes is not None else [], dtype=np.float32)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{source}: boxes must have shape (N, 4) in xyxy order, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{source}: boxes contain non-finite values")
    return arr


def xywh_to_xyxy(boxes) -> np.ndarray:
    """COCO ``[x, y, w, h]`` to ``[x0, y0, x1, y1]``."""
    arr = as_boxes(boxes, "xywh boxes")
    out = arr.copy()
    out[:, 2:] = arr[:, :2] + arr[:, 2:]
    return out


def validate_boxes(
    boxes, image_size: Sequence[int], labels=None, source: str = "", warn=True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Clip boxes to ``image_size = (H, W)`` and drop the unusable ones.

    Returns ``(boxes, labels, messages)``: the kept boxes ``(M, 4)``, their labels ``(M,)`` and one message per
    box that was clipped or dropped (also logged as a warning naming ``source`` when ``warn``). Boxes given as
    ``x1 < x0`` are not silently swapped: they have no area and are dropped with a message.
    """
    arr = as_boxes(boxes, source or "boxes")
    labs = np.zeros((arr.shape[0],), dtype=np.int64) if labels is None else np.asarray(labels).reshape(-1)
    if labs.shape[0] != arr.shape[0]:
        raise ValueError(f"{source}: {arr.shape[0]} boxes but {labs.shape[0]} box labels")
    h, w = float(image_size[0]), float(image_size[1])
    keep, messages = [], []
    clipped = arr.copy()
    clipped[:, [0, 2]] = np.clip(arr[:, [0, 2]], 0.0, w)
    clipped[:, [1, 3]] = np.clip(arr[:, [1, 3]], 0.0, h)
    for i, (orig, new) in enumerate(zip(arr, clipped)):
        if orig[2] <= orig[0] or orig[3] <= orig[1]:
            messages.append(f"{source}: box {i} {orig.tolist()} has no area, dropped")
        elif new[2] <= new[0] or new[3] <= new[1]:
            messages.append(f"{source}: box {i} {orig.tolist()} lies outside the {int(w)}x{int(h)} image, dropped")
        else:
            if not np.array_equal(orig, new):
                messages.append(f"{source}: box {i} {orig.tolist()} clipped to {new.tolist()} (image {int(w)}x{int(h)})")
            keep.append(i)
    if warn:
        for m in messages:
            logger.warning(m)
    idx = np.asarray(keep, dtype=np.int64)
    return clipped[idx].reshape(-1, 4), labs[idx], messages
