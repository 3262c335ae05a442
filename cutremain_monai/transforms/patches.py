"""Random patches with their image's label, for background learning (seed 003; ../shared/METHODS.md section 4).

:class:`RandPatches` cuts ``num_patches`` random ``patch_size`` squares from a ``(C, H, W)`` image;
:class:`RandPatchesd` does it for a sample and returns one sample per patch (a list, as MONAI's
``RandSpatialCropSamplesd`` does: ``list_data_collate`` flattens it into the batch), each labelled with the image's
label. Target images (label 1) give ``num_patches`` patches, background images (label 0) ``background_patches``
(:func:`background_plan` sets it, or repeats background images, to reach a background ratio).

Keys cropped alongside (``box_mask``) let the analysis tell the patch types of the seed's Figure 4: ``P`` = a target
image's patch with at least ``min_inside`` (10%) of its pixels inside a box, ``F`` = a target image's other patches
(mislabelled "target": the label noise decision-boundary induction must absorb), ``N`` = a background image's;
``"?"`` = a target image without a mask (type unknown). Training needs no boxes.

What this adds over ``RandSpatialCropSamplesd``: a patch count that depends on the label, the P / F / N type and
the patch's position (``patch_box``, xyxy in the sample's pixels) in each output sample.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform

from cutremain_monai.constants import BOX_MASK, IMAGE, LABEL

__all__ = ["RandPatches", "RandPatchesd", "RandPatchesD", "RandPatchesDict", "patch_type", "background_plan",
           "PATCH_TYPE", "PATCH_BOX"]

logger = logging.getLogger(__name__)
PATCH_TYPE = "patch_type"
PATCH_BOX = "patch_box"


def patch_type(label: float, mask_patch, min_inside: float = 0.1) -> str:
    """``"N"`` for a background image's patch; for a target image's, ``"P"`` when at least ``min_inside`` of its
    pixels are inside a box (``mask_patch`` > 0.5), ``"F"`` otherwise, ``"?"`` without a mask."""
    if float(label) <= 0.5:
        return "N"
    if mask_patch is None:
        return "?"
    inside = float((torch.as_tensor(mask_patch) > 0.5).float().mean())
    return "P" if inside >= min_inside else "F"


class RandPatches(Randomizable, Transform):
    """``num_patches`` random ``patch_size x patch_size`` crops of a ``(C, H, W)`` image, uniformly placed (whole
    patches only): ``(N, C, p, p)``; :attr:`corners` holds their top-left ``(y, x)``."""

    def __init__(self, num_patches: int = 8, patch_size: int = 48):
        if num_patches < 1 or patch_size < 1:
            raise ValueError(f"num_patches and patch_size must be >= 1, got {num_patches}, {patch_size}")
        self.num_patches, self.patch_size = int(num_patches), int(patch_size)
        self.corners = np.zeros((0, 2), dtype=np.int64)

    def randomize(self, spatial_size: Sequence[int], n: int | None = None) -> None:
        h, w = int(spatial_size[0]), int(spatial_size[1])
        p = self.patch_size
        if h < p or w < p:
            raise ValueError(f"image {h}x{w} is smaller than the patch size {p}")
        n = self.num_patches if n is None else int(n)
        self.corners = np.stack([self.R.randint(0, h - p + 1, size=n), self.R.randint(0, w - p + 1, size=n)], axis=1)

    def crop(self, img, corners=None):
        p = self.patch_size
        corners = self.corners if corners is None else corners
        return [img[:, y : y + p, x : x + p] for y, x in corners]

    def __call__(self, img, randomize: bool = True):
        if img.ndim != 3:
            raise ValueError(f"image must be (C, H, W), got shape {tuple(img.shape)}")
        if randomize:
            self.randomize(img.shape[-2:])
        crops = self.crop(img)
        return torch.stack([torch.as_tensor(c) for c in crops]) if crops else torch.zeros((0, img.shape[0], self.patch_size, self.patch_size))


class RandPatchesd(Randomizable, MapTransform):
    """Dictionary wrapper: one output sample per patch (see the module docstring).

    Args:
        keys: image keys cropped at the same places (``image``).
        label_key: the image's label (> 0.5: target image).
        mask_key: the box mask, cropped alongside and used for the patch type (missing: type ``"?"`` for targets).
        num_patches: patches per target image (8 in the seed).
        patch_size: side in pixels (48 in the seed, from 256 x 256 images).
        background_patches: patches per background image (default ``num_patches``; :func:`background_plan`).
        min_inside: share of a patch's pixels inside a box that makes it type ``P``.
        keep_keys: other keys copied into every patch sample (e.g. ``image_path``); the rest are dropped, so a
            batch holds only what the classifier needs.
    """

    def __init__(self, keys: KeysCollection = IMAGE, label_key: str = LABEL, mask_key: str | None = BOX_MASK,
                 num_patches: int = 8, patch_size: int = 48, background_patches: int | None = None,
                 min_inside: float = 0.1, keep_keys: Sequence[str] = (), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.patcher = RandPatches(num_patches, patch_size)
        self.label_key, self.mask_key = label_key, mask_key
        self.background_patches = int(num_patches if background_patches is None else background_patches)
        if self.background_patches < 1:
            raise ValueError(f"background_patches must be >= 1, got {background_patches}")
        self.min_inside, self.keep_keys = float(min_inside), tuple(keep_keys)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.patcher.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        spatial_size, n = data
        self.patcher.randomize(spatial_size, n)

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict]:
        d = dict(data)
        if self.label_key not in d:
            raise KeyError(f"RandPatchesd: sample {d.get('image_path', '')!s} has no '{self.label_key}'")
        label = float(np.asarray(torch.as_tensor(d[self.label_key]).detach().cpu()).reshape(-1)[0])
        keys = list(self.key_iterator(d))
        if not keys:
            return [d]
        n = self.patcher.num_patches if label > 0.5 else self.background_patches
        self.randomize((d[keys[0]].shape[-2:], n))
        crops = {k: self.patcher.crop(d[k]) for k in keys}
        mask = d.get(self.mask_key) if self.mask_key else None
        masks = self.patcher.crop(mask) if mask is not None else [None] * n
        p = self.patcher.patch_size
        out = []
        for i, (y, x) in enumerate(self.patcher.corners):
            s = {k: crops[k][i] for k in keys}
            s[self.label_key] = torch.tensor([label], dtype=torch.float32)
            s[PATCH_TYPE] = patch_type(label, masks[i], self.min_inside)
            s[PATCH_BOX] = torch.tensor([x, y, x + p, y + p], dtype=torch.float32)
            if mask is not None:
                s[self.mask_key] = masks[i]
            for k in self.keep_keys:
                if k in d:
                    s[k] = d[k]
            out.append(s)
        return out


RandPatchesD = RandPatchesDict = RandPatchesd


def background_plan(items: Sequence[dict], bg_ratio: float = 1.0, num_patches: int = 8, mode: str = "patches",
                    label_key: str = LABEL, seed: int = 0) -> tuple[list[dict], int]:
    """Reach ``bg_ratio`` background patches per target patch over a datalist: ``(items, background_patches)``.

    ``mode="patches"``: the items unchanged and ``background_patches = round(bg_ratio * num_patches * n_target /
    n_background)`` per background image (at least 1). ``mode="images"``: every background image gives
    ``num_patches`` and the background items are repeated (or, below one copy, subsampled with ``seed``) to
    ``round(bg_ratio * n_target)`` items. Labels > 0.5 are targets."""
    if mode not in ("patches", "images"):
        raise ValueError(f"mode must be 'patches' or 'images', got {mode!r}")
    if bg_ratio <= 0:
        raise ValueError(f"bg_ratio must be > 0, got {bg_ratio}")
    items = list(items)
    is_target = [float(np.asarray(it[label_key], dtype=float).reshape(-1)[0]) > 0.5 for it in items]
    targets = [it for it, t in zip(items, is_target) if t]
    background = [it for it, t in zip(items, is_target) if not t]
    if not targets or not background:
        raise ValueError(f"background learning needs target and background images; got {len(targets)} target, "
                         f"{len(background)} background")
    if mode == "patches":
        k = max(1, int(round(bg_ratio * num_patches * len(targets) / len(background))))
        logger.info("background plan: %d target and %d background images, %d patches per background image: BG x%.2f "
                    "(asked x%g)", len(targets), len(background), k, k * len(background) / (num_patches * len(targets)), bg_ratio)
        return items, k
    want = max(1, int(round(bg_ratio * len(targets))))
    rng = np.random.default_rng(seed)
    reps, rest = divmod(want, len(background))
    chosen = background * reps + [background[i] for i in sorted(rng.choice(len(background), size=rest, replace=False))]
    logger.info("background plan: %d target images, %d background items from %d images: BG x%.2f (asked x%g)",
                len(targets), len(chosen), len(background), len(chosen) / len(targets), bg_ratio)
    return targets + chosen, int(num_patches)
