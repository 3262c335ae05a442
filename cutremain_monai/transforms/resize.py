"""Resize an X-ray to the training size together with its boxes: the last step of a bundle's deterministic head.

The box-supervised augmentations (Cut&Remain, supervised Cutout, Hide-and-Seek, the batch mixes) then work at the
training resolution, and the persistent cache (:mod:`cutremain_monai.data.preprocessed`) holds images at that size
instead of at the native one (a 3,000 px radiograph is 36 MB as float32; at 448 px it is 0.4 MB as uint16).

What it adds to MONAI's ``Resized`` (used for the image, area interpolation by default) and its detection
``ResizeBox`` (used for the boxes): our boxes are ``xyxy`` with x = column, while MONAI's box transforms index
boxes by array axis, so the boxes are swapped around ``ResizeBox``; the image's own size before resizing is
recorded (``native_size``, ``[H, W]``), so a map or a box found at the model's size can be taken back to the
image's pixels; and images of any size, with or without boxes, go through one transform.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.apps.detection.transforms.array import ResizeBox
from monai.config import KeysCollection
from monai.transforms import MapTransform, Resize

from cutremain_monai.constants import BOXES, IMAGE
from cutremain_monai.transforms.boxes import check_boxes

__all__ = ["resize_boxes", "ResizeWithBoxesd", "ResizeWithBoxesD", "ResizeWithBoxesDict"]


def resize_boxes(boxes, src_size: Sequence[int], dst_size: Sequence[int]) -> np.ndarray:
    """``(N, 4)`` xyxy boxes (x = column) of an image of ``src_size = (H, W)`` in the pixels of ``dst_size``."""
    arr = check_boxes(boxes)
    if len(arr) == 0:
        return arr
    swapped = arr[:, [1, 0, 3, 2]]  # MONAI's order: array axis 0 (rows) first
    out = np.asarray(ResizeBox(spatial_size=tuple(int(v) for v in dst_size))(swapped, tuple(int(v) for v in src_size)))
    return out[:, [1, 0, 3, 2]].astype(np.float32)


class ResizeWithBoxesd(MapTransform):
    """Resize ``keys`` (images; ``area``) and ``mask_keys`` (``nearest``) to ``spatial_size``; scale ``box_key``.

    Args:
        keys: image keys (the first one's size is the source size of the boxes).
        spatial_size: ``(H, W)`` after resizing.
        box_key: boxes ``(N, 4)`` xyxy in the image's pixels (absent: nothing to scale).
        mask_keys: label-like keys resized with nearest neighbour (lung masks, segmentation labels).
        mode: interpolation of ``keys`` (MONAI's ``Resize`` modes).
        native_key: where the source ``[H, W]`` is recorded (``None``: not recorded).
    """

    def __init__(self, keys: KeysCollection = IMAGE, spatial_size: Sequence[int] = (448, 448), box_key: str = BOXES,
                 mask_keys: KeysCollection = (), mode: str = "area", native_key: str | None = "native_size",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = tuple(int(v) for v in spatial_size)
        self.box_key = box_key
        self.mask_keys = (mask_keys,) if isinstance(mask_keys, str) else tuple(mask_keys)
        self.native_key = native_key
        self.resize = Resize(self.spatial_size, mode=mode)
        self.resize_mask = Resize(self.spatial_size, mode="nearest")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        src = tuple(int(v) for v in d[keys[0]].shape[-2:])
        for key in keys:
            d[key] = self.resize(d[key])
        for key in self.mask_keys:
            if key in d and d[key] is not None:
                d[key] = self.resize_mask(d[key])
        if self.box_key in d and d[self.box_key] is not None:
            scaled = resize_boxes(d[self.box_key], src, self.spatial_size)
            d[self.box_key] = torch.as_tensor(scaled) if isinstance(d[self.box_key], torch.Tensor) else scaled
        if self.native_key:
            d[self.native_key] = torch.tensor(src)
        return d


ResizeWithBoxesD = ResizeWithBoxesDict = ResizeWithBoxesd
