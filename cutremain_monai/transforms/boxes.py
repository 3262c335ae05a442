"""Box helpers shared by the box-supervised transforms: pixel extents, masks, aspect-ratio variants, validation.

Our boxes are ``xyxy`` with x = column (array axis -1) and y = row (axis -2), because our reader does not
transpose. MONAI's detection transforms index boxes by array axis (their first coordinate is array axis 1,
which after MONAI's transposing ``LoadImage`` is x). :class:`SwapBoxAxesd` converts between the two, so MONAI's
``FlipBoxd`` / ``ZoomBoxd`` / ``BoxToMaskd`` can be reused between a pair of swaps.

Pixel rule: a pixel belongs to a box when its centre lies inside it. Integer boxes cover exactly
``[y0:y1, x0:x1]``; a box too thin to hold a pixel centre still covers the nearest pixel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.apps.detection.transforms.box_ops import convert_box_to_mask
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from cutremain_monai.constants import BOX_MASK, BOXES
from cutremain_monai.io.boxes import validate_boxes

__all__ = [
    "RecordSized",
    "ASPECT_FACTORS",
    "box_pixel_extent",
    "boxes_to_mask",
    "aspect_ratio_boxes",
    "check_boxes",
    "BoxesToMask",
    "BoxesToMaskd",
    "BoxesToMaskD",
    "BoxesToMaskDict",
    "SwapBoxAxesd",
    "SwapBoxAxesD",
    "SwapBoxAxesDict",
]

logger = logging.getLogger(__name__)

ASPECT_FACTORS = (1.0, 1.5, 2.0)


def box_pixel_extent(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)`` slice bounds of the pixels whose centres lie in ``box`` (clipped to the image)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    c0, c1 = math.ceil(x0 - 0.5), math.ceil(x1 - 0.5)
    r0, r1 = math.ceil(y0 - 0.5), math.ceil(y1 - 0.5)
    if c1 <= c0:
        c0 = min(max(int(math.floor(x0)), 0), width - 1)
        c1 = c0 + 1
    if r1 <= r0:
        r0 = min(max(int(math.floor(y0)), 0), height - 1)
        r1 = r0 + 1
    return max(r0, 0), min(r1, height), max(c0, 0), min(c1, width)


def check_boxes(boxes, key: Hashable = BOXES) -> np.ndarray:
    """``boxes`` as float ``(N, 4)``; ``ValueError`` naming ``key`` and the shape otherwise."""
    arr = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes if boxes is not None else [])
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"'{key}' must have shape (N, 4) in xyxy order, got {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"'{key}' must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float32)


def clip_boxes(boxes: np.ndarray, height: int, width: int, source: str = "") -> np.ndarray:
    """Clip to the image; warn (naming ``source``) about clipped boxes; drop empty ones with a warning."""
    kept, _, _ = validate_boxes(boxes, (height, width), source=source or "boxes")
    return kept


def boxes_to_mask(boxes, spatial_size: Sequence[int]) -> np.ndarray:
    """Union mask ``(H, W)`` bool of ``boxes`` (xyxy) through MONAI's ``convert_box_to_mask``.

    Boxes are first snapped to pixel edges with the centre rule, then put in MONAI's axis order (row first).
    """
    h, w = int(spatial_size[0]), int(spatial_size[1])
    arr = check_boxes(boxes)
    if len(arr) == 0:
        return np.zeros((h, w), dtype=bool)
    snapped = np.asarray([box_pixel_extent(b, h, w) for b in arr], dtype=np.int32)  # r0, r1, c0, c1
    monai_order = snapped[:, [0, 2, 1, 3]]  # (r0, c0, r1, c1): axis 0 = rows, as MONAI indexes the array
    masks = convert_box_to_mask(monai_order, np.ones(len(arr), dtype=np.int16), (h, w), bg_label=0)
    return np.asarray(masks).max(axis=0) > 0


def aspect_ratio_boxes(box: Sequence[float], factors: Sequence[float] = ASPECT_FACTORS, image_size=None) -> np.ndarray:
    """The ``len(factors) ** 2`` variants of ``box``: width times fw, height times fh, same centre.

    Order: ``for fw in factors: for fh in factors`` (so with {1, 1.5, 2} row 0 is the box itself). Clipped to
    ``image_size = (H, W)`` when given.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    out = np.asarray(
        [[cx - fw * bw / 2, cy - fh * bh / 2, cx + fw * bw / 2, cy + fh * bh / 2] for fw in factors for fh in factors],
        dtype=np.float32,
    )
    if image_size is not None:
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, image_size[1])
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, image_size[0])
    return out


class BoxesToMask(Transform):
    """Boxes ``(N, 4)`` xyxy -> union mask ``(1, H, W)`` (float32 0/1) for an image of ``spatial_size``."""
    def __call__(self, boxes, spatial_size: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(boxes_to_mask(boxes, spatial_size)[None].astype(np.float32))


class BoxesToMaskd(MapTransform):
    """Dictionary wrapper of :class:`BoxesToMask`: ``boxes`` -> ``box_mask`` sized like ``image``.

    The mask is what batch-level transforms (``SupCutmixd``, ``SupMixupd``) read after collation, where boxes of
    different counts cannot be stacked.
    """
    def __init__(
        self,
        keys: KeysCollection = BOXES,
        image_key: str = "image",
        mask_key: str = BOX_MASK,
        allow_missing_keys: bool = False,
        box_labels: Sequence[str] | None = None,
        labels_key: str = "box_labels",
    ):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.mask_key = mask_key
        self.converter = BoxesToMask()
        self.box_labels = None if box_labels is None else {str(b) for b in box_labels}
        self.labels_key = labels_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.image_key not in d:
            raise KeyError(f"BoxesToMaskd needs '{self.image_key}' for the mask size")
        size = tuple(d[self.image_key].shape[-2:])
        for key in self.key_iterator(d):
            boxes = check_boxes(d[key], key)
            if self.box_labels is not None:  # only the boxes of these labels (e.g. the lesion, not normal regions)
                labels = [str(v) for v in d.get(self.labels_key, [])]
                if len(labels) != len(boxes):
                    raise ValueError(f"BoxesToMaskd: {len(boxes)} boxes but {len(labels)} '{self.labels_key}' in "
                                     f"{d.get('image_path', 'the sample')}")
                boxes = boxes[[lab in self.box_labels for lab in labels]] if len(boxes) else boxes
            d[self.mask_key] = self.converter(boxes, size)
        return d


class SwapBoxAxesd(MapTransform):
    """Swap x and y of ``xyxy`` boxes (self-inverse): our (column, row) order <-> MONAI's array-axis order.

    Wrap MONAI's detection box transforms between two of these, e.g.
    ``[SwapBoxAxesd("boxes"), FlipBoxd(image_keys="image", box_keys="boxes", spatial_axis=1), SwapBoxAxesd("boxes")]``
    flips columns (``spatial_axis=1`` is the last axis of a ``(C, H, W)`` image).
    """
    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            b = d[key]
            if isinstance(b, torch.Tensor):
                d[key] = b[..., [1, 0, 3, 2]]
            else:
                d[key] = check_boxes(b, key)[:, [1, 0, 3, 2]]
        return d


BoxesToMaskD = BoxesToMaskDict = BoxesToMaskd
SwapBoxAxesD = SwapBoxAxesDict = SwapBoxAxesd


class RecordSized(MapTransform):
    """Store the spatial size of ``keys[0]`` as ``name`` (``[H, W]``) before a resize, so a box found at the
    model's size can be taken back to the image's own pixels (background learning's inference boxes)."""
    def __init__(self, keys: KeysCollection = "image", name: str = "native_size", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.name = name

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.name] = torch.tensor([int(v) for v in d[key].shape[-2:]])
            break
        return d
