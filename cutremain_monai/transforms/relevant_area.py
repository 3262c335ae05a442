"""Relevant-area boxes for images that have no box: Cut&Remain's premise on data sets that box only the lesion.

The Cut&Remain paper's surgeons "annotated the bounding boxes of the relevant areas, including normal images": a
Cut&Remain copy of a normal image is then a normal copy, and the copies of both classes look alike (mostly black,
one patch of anatomy). Data sets such as FracAtlas box only the fractures, so every copy is a positive and a
network can learn "a black image with a bright patch is a fracture". :class:`RelevantAreaBoxesd` gives each image
without a box ``num_boxes`` boxes whose sizes are drawn from the lesion boxes' sizes (as fractions of their
image, :func:`lesion_box_fractions`, from the training section only) and whose centres lie inside the body (an
Otsu mask of the image, its largest component; or a given mask such as the lung mask), so the copies of normal
and abnormal images are made the same way.

Why a transform and not an importer option: it needs the decoded image (the body mask), it works on any datalist
(FracAtlas, an ingest, a PACS export), it is deterministic per image (seeded by the image's name and ``seed``, not
Randomizable), so it belongs to the cached head of the chain and a run is reproducible; and the boxes never reach a
datalist, where they could be mistaken for annotations.

The boxes are labelled ``relevant_area``. The bundles' ``lesion_box_labels`` lists the lesion labels only, so
halves, the localisation metrics and the DICOM results never count a relevant-area box as a finding; Cut&Remain,
Cutout and the box masks use every box.

:class:`BodyMaskd` puts the same body mask in the sample as a guidance mask (``guidance_mask: body_mask``): the
foreground of guided training on images whose only boxes are small lesions, as the lungs are ISNet's (issue 30).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage
from skimage.filters import threshold_otsu

from cutremain_monai.constants import BODY_MASK, BOX_LABELS, BOXES, IMAGE, RELEVANT_AREA
from cutremain_monai.io.importers import image_size

__all__ = ["RELEVANT_AREA", "BODY_MASK", "body_mask", "lesion_box_fractions", "relevant_area_boxes", "RelevantAreaBoxesd",
           "RelevantAreaBoxesD", "RelevantAreaBoxesDict", "BodyMaskd", "BodyMaskD", "BodyMaskDict"]

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS = ((0.06, 0.06), (0.1, 0.1), (0.15, 0.15))  # when no lesion box is known


def body_mask(image: np.ndarray) -> np.ndarray:
    """The body of an X-ray ``(H, W)``: pixels above Otsu's threshold, largest connected component (bool).

    A flat image (no threshold) gives the whole image."""
    img = np.asarray(image, dtype=np.float32)
    if float(img.max()) <= float(img.min()):
        return np.ones(img.shape, dtype=bool)
    fg = img > threshold_otsu(img)
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.ones(img.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def lesion_box_fractions(items: Sequence[Mapping], lesion_labels: Sequence[str] | None = None,
                         box_key: str = BOXES, labels_key: str = BOX_LABELS, image_key: str = IMAGE) -> list[list[float]]:
    """``[w / W, h / H]`` of every lesion box of ``items`` (sizes from the image headers); empty when none.

    Give the training section only: the relevant-area boxes of validation and test images are then drawn from a
    distribution their own boxes did not shape."""
    wanted = None if lesion_labels is None else {str(v) for v in lesion_labels}
    out = []
    for it in items:
        boxes = np.asarray(it.get(box_key) or [], dtype=np.float64).reshape(-1, 4)
        labels = list(it.get(labels_key) or [None] * len(boxes))
        keep = [b for b, lab in zip(boxes, labels) if wanted is None or str(lab) in wanted]
        if not keep:
            continue
        size = image_size(str(it[image_key]))
        if size is None:
            continue
        h, w = size
        out += [[float((b[2] - b[0]) / w), float((b[3] - b[1]) / h)] for b in keep]
    return out


def _rng(identifier: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{identifier}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def relevant_area_boxes(mask: np.ndarray, fractions: Sequence[Sequence[float]], rng: np.random.Generator,
                        num_boxes: int = 1) -> np.ndarray:
    """``num_boxes`` xyxy boxes (x = column) of sizes drawn from ``fractions`` of the image, centred on pixels of
    ``mask`` (chosen uniformly), shifted to lie inside the image."""
    h, w = mask.shape
    fr = np.asarray(fractions if len(fractions) else DEFAULT_FRACTIONS, dtype=np.float64).reshape(-1, 2)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        ys, xs = np.array([h // 2]), np.array([w // 2])
    out = []
    for _ in range(num_boxes):
        fw, fh = fr[int(rng.integers(len(fr)))]
        bw, bh = min(max(fw * w, 1.0), w), min(max(fh * h, 1.0), h)
        k = int(rng.integers(len(ys)))
        cx, cy = xs[k] + 0.5, ys[k] + 0.5
        x0 = min(max(cx - bw / 2, 0.0), w - bw)
        y0 = min(max(cy - bh / 2, 0.0), h - bh)
        out.append([x0, y0, x0 + bw, y0 + bh])
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


class RelevantAreaBoxesd(MapTransform):
    """Give an image without boxes ``num_boxes`` relevant-area boxes (module doc); images with boxes pass unchanged.

    Args:
        keys: the image key (its first channel gives the body mask and the size).
        fractions: ``[[w / W, h / H], ...]`` to draw the box sizes from (:func:`lesion_box_fractions` of the training
            section); empty or None: :data:`DEFAULT_FRACTIONS`.
        num_boxes: boxes per unboxed image.
        mask_key: a mask to place the centres in (e.g. ``lung_mask``) when the sample has it; else the body mask.
        label: the boxes' label (``relevant_area``); seed: with the image's name, the draw of each image.
        id_key: the key naming the image for the seed (default ``image_id``, else the image path).
        enabled: False: the transform does nothing (a bundle switch).
    """

    def __init__(self, keys: KeysCollection = IMAGE, fractions: Sequence[Sequence[float]] | None = None,
                 num_boxes: int = 1, mask_key: str | None = None, label: str = RELEVANT_AREA, seed: int = 0,
                 box_key: str = BOXES, labels_key: str = BOX_LABELS, id_key: str = "image_id", enabled: bool = True,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if num_boxes < 1:
            raise ValueError(f"num_boxes must be at least 1, got {num_boxes}")
        self.fractions = [list(map(float, f)) for f in (fractions or [])]
        self.num_boxes, self.mask_key, self.label, self.seed = int(num_boxes), mask_key, label, int(seed)
        self.box_key, self.labels_key, self.id_key, self.enabled = box_key, labels_key, id_key, enabled

    def _identifier(self, d: Mapping, key: Hashable) -> str:
        value = d.get(self.id_key) or d.get("image_path")
        if value is None:
            meta = getattr(d[key], "meta", {}) or {}
            value = meta.get("filename_or_obj", "")
        return str(value)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        keys = list(self.key_iterator(d))
        boxes = d.get(self.box_key)
        if not keys or (boxes is not None and len(boxes) > 0):
            return d
        key = keys[0]
        img = d[key]
        plane = (img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img))[0]
        mask = None
        if self.mask_key and d.get(self.mask_key) is not None and not isinstance(d[self.mask_key], str):
            m = d[self.mask_key]
            mask = (m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m))[0] > 0.5
            if mask.shape != plane.shape or not mask.any():
                mask = None
        if mask is None:
            mask = body_mask(plane)
        new = relevant_area_boxes(mask, self.fractions, _rng(self._identifier(d, key), self.seed), self.num_boxes)
        d[self.box_key] = new
        d[self.labels_key] = [self.label] * len(new)
        return d


RelevantAreaBoxesD = RelevantAreaBoxesDict = RelevantAreaBoxesd


class BodyMaskd(MapTransform):
    """``mask_key`` ``(1, H, W)`` float32: the body mask (:func:`body_mask`) of the image's first channel, at the size
    the image has here (the bundles run it after resizing). The foreground guided training keeps relevance or
    attention in when the boxes are small lesions: a lesion box of ~1% of the image asks the network to find
    nothing outside it, and on normal images there is no lesion box at all, while lead markers and text lie outside
    the body. What it adds to MONAI (whose foreground transforms crop rather than return the mask): Otsu's
    threshold with the largest connected component, so a marker letter in the air is not body.

    Args:
        keys: the image key. mask_key: where the mask goes. enabled: False: nothing is added (a bundle switch).
    """

    def __init__(self, keys: KeysCollection = IMAGE, mask_key: str = BODY_MASK, enabled: bool = True,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.enabled = mask_key, enabled

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            plane = (img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img))[0]
            d[self.mask_key] = body_mask(plane)[None].astype(np.float32)
        return d


BodyMaskD = BodyMaskDict = BodyMaskd
