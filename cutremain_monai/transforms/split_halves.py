"""Cut an image vertically into left and right halves, as the Cut&Remain paper does for clavicle and pelvis
X-rays (each half holds one clavicle / one hip), with boxes and labels following.

Boxes go to the half they fall in (x shifted for the right half). A box across the midline is clipped into both
halves and kept in a half only where at least ``min_fraction`` of its area remains there. Label rule: a half that
keeps a lesion box takes the image label; a half without one takes ``normal_label``. Which box labels count as
lesions is ``lesion_box_labels`` (default: every box); normal-region boxes (the paper annotates normal images
too) are carried along but do not make a half abnormal. An image without boxes gives both halves its own label
when it equals ``normal_label`` (a normal image) and, since the lesion's side is unknown, both halves the image
label otherwise (documented risk of label noise; annotate to avoid it).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, SpatialCrop, Transform

from cutremain_monai.constants import BOX_LABELS, BOXES, IMAGE, LABEL
from cutremain_monai.transforms.boxes import check_boxes

__all__ = ["SplitHalves", "SplitHalvesd", "SplitHalvesD", "SplitHalvesDict", "split_boxes"]


def split_boxes(boxes: np.ndarray, width: int, min_fraction: float = 0.25) -> list[tuple[np.ndarray, np.ndarray]]:
    """For the left and right halves: (indices of kept boxes, boxes in that half's pixel frame)."""
    mid = width // 2
    out = []
    for lo, hi in ((0, mid), (mid, width)):
        idx, kept = [], []
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            cx0, cx1 = max(x0, lo), min(x1, hi)
            if cx1 <= cx0 or (cx1 - cx0) < min_fraction * (x1 - x0):
                continue
            idx.append(i)
            kept.append([cx0 - lo, y0, cx1 - lo, y1])
        out.append((np.asarray(idx, dtype=np.int64), np.asarray(kept, dtype=np.float32).reshape(-1, 4)))
    return out


class SplitHalves(Transform):
    """Array transform: ``(C, H, W)`` -> ``[left (C, H, W//2), right (C, H, W - W//2)]`` via MONAI ``SpatialCrop``
    (so a MetaTensor's affine follows the crop)."""

    def __call__(self, img) -> list:
        if img.ndim != 3:
            raise ValueError(f"image must be (C, H, W), got shape {tuple(img.shape)}")
        h, w = img.shape[-2:]
        mid = w // 2
        return [SpatialCrop(roi_start=(0, 0), roi_end=(h, mid))(img), SpatialCrop(roi_start=(0, mid), roi_end=(h, w))(img)]


class SplitHalvesd(MapTransform):
    """Dictionary version: returns ``[left_sample, right_sample]`` (``list_data_collate`` flattens them).

    Args:
        keys: image-like keys to split (image, masks).
        box_key / box_label_key / label_key: boxes, their labels and the sample label.
        min_fraction: a box crossing the midline stays in a half only if this share of its width remains there.
        normal_label: label of a half without a lesion box (0 for binary; for one-hot or multi-label targets give
            the full vector, e.g. ``[1, 0, 0]``).
        lesion_box_labels: box labels that count as lesions (``None``: all).
        half_key: records ``"left"`` / ``"right"``.
    """

    def __init__(
        self,
        keys: KeysCollection = IMAGE,
        box_key: str = BOXES,
        box_label_key: str = BOX_LABELS,
        label_key: str = LABEL,
        min_fraction: float = 0.25,
        normal_label=0,
        lesion_box_labels: Sequence | None = None,
        half_key: str | None = "half",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.box_key, self.box_label_key, self.label_key = box_key, box_label_key, label_key
        self.min_fraction = min_fraction
        self.normal_label = normal_label
        self.lesion_box_labels = None if lesion_box_labels is None else set(lesion_box_labels)
        self.half_key = half_key
        self.splitter = SplitHalves()

    def _is_lesion(self, label) -> bool:
        return self.lesion_box_labels is None or label in self.lesion_box_labels

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            raise KeyError(f"SplitHalvesd: none of the keys {self.keys} is present")
        w = d[keys[0]].shape[-1]
        halves = [dict(d), dict(d)]
        for key in keys:
            for half, part in zip(halves, self.splitter(d[key])):
                half[key] = part
        boxes = check_boxes(d.get(self.box_key), self.box_key)
        box_labels = list(d.get(self.box_label_key, [None] * len(boxes)))
        if len(box_labels) != len(boxes):
            raise ValueError(f"'{self.box_label_key}' has {len(box_labels)} entries for {len(boxes)} boxes")
        image_label = d.get(self.label_key)
        any_lesion = any(self._is_lesion(lab) for lab in box_labels)
        for (idx, kept), half, side in zip(split_boxes(boxes, w, self.min_fraction), halves, ("left", "right")):
            if self.box_key in d:
                half[self.box_key] = torch.as_tensor(kept) if isinstance(d[self.box_key], torch.Tensor) else kept
            labels_here = [box_labels[i] for i in idx]
            if self.box_label_key in d:
                half[self.box_label_key] = labels_here
            if self.label_key in d:
                if any(self._is_lesion(lab) for lab in labels_here):
                    half[self.label_key] = image_label
                elif any_lesion or _equal(image_label, self.normal_label):
                    half[self.label_key] = _like(self.normal_label, image_label)
                else:
                    half[self.label_key] = image_label  # abnormal image without boxes: side unknown
            if self.half_key:
                half[self.half_key] = side
        return halves


def _equal(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def _like(value, template):
    if isinstance(template, torch.Tensor):
        return torch.as_tensor(value, dtype=template.dtype).reshape(template.shape)
    if isinstance(template, np.ndarray):
        return np.asarray(value, dtype=template.dtype).reshape(template.shape)
    return value


SplitHalvesD = SplitHalvesDict = SplitHalvesd
