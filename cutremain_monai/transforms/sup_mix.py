"""Supervised (box-aware) Cutout, Mixup and Cutmix: the Cut&Remain paper's Table 1 baselines.

* ``SupCutout`` / ``SupCutoutd`` (per sample): removes a random rectangle whose centre is drawn outside the box
  (``1 - M``); box pixels are never touched.
* ``SupMixup`` / ``SupMixupd`` (per batch, after collation): ``x~ = lam * M_A * x_A + (1 - lam) * M_B * x_B``,
  ``y~ = lam * y_A + (1 - lam) * y_B``, ``lam ~ Beta(alpha, alpha)``: both images are reduced to their own box
  region (Cut&Remain) before mixing, so the mix only ever shows annotated regions. ``SupMixupd`` sets the mixed
  samples' ``box_mask`` to the union ``max(M_A, M_B)``; ``SupCutmixd`` leaves ``M_A`` (the labelled lesion).
  Other masks of the image (``mask_follow_keys``, e.g. the ``body_mask`` that guided training keeps relevance in)
  follow the mix: a mixed sample's mask is where the mixed image shows a source pixel that the source's mask
  covers (Cutmix: ``M_A b_A + (1 - M_A) b_B``; Mixup: ``M_A b_A`` or ``M_B b_B``).
* ``SupCutmix`` / ``SupCutmixd`` (per batch): ``x~ = M_A * x_A + (1 - M_A) * x_B``, ``y~ = y_A`` (the paper's
  rule: the lesion of A is kept whole, B only supplies context). ``label_rule="area"`` instead weights the labels
  by the real kept area, ``lam = |M_A| / (H * W)``, ``y~ = lam * y_A + (1 - lam) * y_B`` (timm's
  ``cutmix_bbox_and_lam`` idea, with the area of the clipped box mask).
* ``prob`` (both): the probability that an eligible sample is mixed (drawn per sample; the others pass unchanged
  and may still be drawn as partners). The default 1 mixes every boxed sample, the Table 1 baseline. Where only
  lesions are boxed that means a network trained with ``SupMixup`` never sees a whole lesioned image (each is a mix
  of box regions on black) while every whole image it sees is normal; measured on FracAtlas (clavicle docs), it
  scores every whole fractured radiograph as normal. ``prob < 1`` keeps whole images of both labels in training.

Pairs are drawn within the batch with ``self.R`` (a permutation). Labels are mixed as plain tensors (binary
``(B,)`` / ``(B, 1)``, one-hot multi-class ``(B, K)``, multi-label ``(B, K)``), never through a spatial path (which
is what MONAI's ``CutMix`` does to class labels). Masks come from ``box_mask`` ``(B, 1, H, W)`` made per sample by
``BoxesToMaskd`` before collation (resize them with ``mode="nearest"``: values between 0 and 1 blend the two
images at the box edge, values outside [0, 1] are thresholded at 0). Samples without a box: with ``no_box="skip"`` (default) they are returned
unchanged and never used as partners; with ``no_box="full"`` their mask is the whole image (plain Mixup/Cutmix
for them).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform

from cutremain_monai.constants import BODY_MASK, BOX_MASK, BOXES, IMAGE, LABEL
from cutremain_monai.transforms.boxes import box_pixel_extent, check_boxes, clip_boxes

__all__ = [
    "SupCutout",
    "SupCutoutd",
    "SupCutoutD",
    "SupCutoutDict",
    "SupMixup",
    "SupMixupd",
    "SupMixupD",
    "SupMixupDict",
    "SupCutmix",
    "SupCutmixd",
    "SupCutmixD",
    "SupCutmixDict",
]


class SupCutout(Randomizable, Transform):
    """Cutout that never touches the box: a rectangle of ``size`` (fraction of each side, drawn uniformly from the
    range) centred on a pixel drawn outside the boxes is set to ``fill_value``; box pixels keep their values.

    Args:
        size: (min, max) side of the removed rectangle as a fraction of the image side.
        prob: probability of applying it.
    """

    def __init__(self, size: Sequence[float] = (0.2, 0.4), fill_value: float = 0.0, prob: float = 1.0):
        if not (0 < size[0] <= size[1] <= 1):
            raise ValueError(f"size must be 0 < min <= max <= 1, got {size}")
        self.size = (float(size[0]), float(size[1]))
        self.fill_value = fill_value
        self.prob = prob
        self._rect: tuple[int, int, int, int] | None = None

    def randomize(self, spatial_size: Sequence[int], boxes: np.ndarray) -> None:
        h, w = int(spatial_size[0]), int(spatial_size[1])
        self._rect = None
        if self.R.random() >= self.prob:
            return
        inside = np.zeros((h, w), dtype=bool)
        for b in boxes:
            r0, r1, c0, c1 = box_pixel_extent(b, h, w)
            inside[r0:r1, c0:c1] = True
        outside = np.flatnonzero(~inside)
        if outside.size == 0:
            return
        centre = int(outside[self.R.randint(outside.size)])
        cy, cx = divmod(centre, w)
        s = self.R.uniform(*self.size)
        hh, hw = max(1, int(round(s * h))), max(1, int(round(s * w)))
        r0, c0 = cy - hh // 2, cx - hw // 2
        self._rect = (max(r0, 0), min(r0 + hh, h), max(c0, 0), min(c0 + hw, w))

    def __call__(self, img, boxes, randomize: bool = True):
        boxes = check_boxes(boxes)
        if randomize:
            self.randomize(img.shape[-2:], boxes)
        if self._rect is None:
            return img
        h, w = img.shape[-2:]
        out = img.clone() if isinstance(img, torch.Tensor) else img.copy()
        r0, r1, c0, c1 = self._rect
        out[..., r0:r1, c0:c1] = self.fill_value
        for b in boxes:  # restore the box pixels: (1 - M) only
            br0, br1, bc0, bc1 = box_pixel_extent(b, h, w)
            out[..., br0:br1, bc0:bc1] = img[..., br0:br1, bc0:bc1]
        return out


class SupCutoutd(Randomizable, MapTransform):
    """Dictionary wrapper of :class:`SupCutout` (one draw per sample, applied to every key)."""

    def __init__(
        self,
        keys: KeysCollection = IMAGE,
        box_key: str = BOXES,
        size: Sequence[float] = (0.2, 0.4),
        fill_value: float = 0.0,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.box_key = box_key
        self.cutout = SupCutout(size, fill_value, prob)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.cutout.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.cutout.randomize(*data)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        if self.box_key not in d and not self.allow_missing_keys:
            raise KeyError(f"SupCutoutd: missing box key '{self.box_key}'")
        h, w = d[keys[0]].shape[-2:]
        boxes = check_boxes(d.get(self.box_key), self.box_key)
        if len(boxes):
            boxes = clip_boxes(boxes, h, w, source=str(keys[0]))
        self.randomize(((h, w), boxes))
        for key in keys:
            d[key] = self.cutout(d[key], boxes, randomize=False)
        return d


def _check_batch(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, image_key="image", label_key="label", mask_key=BOX_MASK):
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"'{image_key}' must be a (B, C, H, W) batch tensor, got shape {tuple(getattr(images, 'shape', ()))}")
    b, _, h, w = images.shape
    if not isinstance(masks, torch.Tensor) or masks.shape != (b, 1, h, w):
        raise ValueError(f"'{mask_key}' must have shape {(b, 1, h, w)}, got {tuple(getattr(masks, 'shape', ()))}")
    if not isinstance(labels, torch.Tensor) or labels.shape[0] != b:
        raise ValueError(f"'{label_key}' must be a tensor with batch size {b}, got shape {tuple(getattr(labels, 'shape', ()))}")


class _BatchMix(Randomizable, Transform):
    """Shared pairing logic: a permutation of the boxed samples (or of all, with ``no_box='full'``).

    The draw is kept as ``source``: a full-batch index where mixed samples point at their partner and the others
    at themselves, so one gather and one ``torch.where`` over the whole batch do the mix (no clone, no
    index_put): the same work as a bare ``torch.where`` mix.
    """

    def __init__(self, no_box: str = "skip", prob: float = 1.0):
        if no_box not in ("skip", "full"):
            raise ValueError(f"no_box must be 'skip' or 'full', got {no_box!r}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.no_box = no_box
        self.prob = float(prob)
        self._targets = torch.zeros(0, dtype=torch.long)  # which samples are mixed
        self._partners = torch.zeros(0, dtype=torch.long)  # their partners
        self._source = torch.zeros(0, dtype=torch.long)  # full-batch partner index (self for unmixed samples)
        self._lam = 1.0

    def _pairs(self, has_box: torch.Tensor) -> None:
        b = has_box.shape[0]
        eligible = torch.arange(b) if self.no_box == "full" else torch.nonzero(has_box.cpu()).flatten()
        self._source = torch.arange(b)
        if eligible.numel() < 2:
            self._targets = self._partners = torch.zeros(0, dtype=torch.long)
            return
        perm = torch.as_tensor(self.R.permutation(eligible.numel()), dtype=torch.long)
        self._targets, self._partners = eligible, eligible[perm]
        if self.prob < 1.0:  # (prob 1 draws nothing more: the same stream as before the option)
            chosen = torch.as_tensor(self.R.random(eligible.numel()) < self.prob)
            self._targets, self._partners = self._targets[chosen], self._partners[chosen]
        self._source[self._targets] = self._partners

    def _prepare(self, images, labels, masks, randomize: bool, effective=None):
        """Check the batch, draw the pairs; ``(masks, source index)`` or None when nothing is mixed."""
        _check_batch(images, labels, masks)
        m, has_box = effective or self._effective_masks(masks, self.no_box)
        if randomize:
            self.randomize(has_box)
        if not self._targets.numel():
            return None
        return m, self._source.to(images.device)

    @staticmethod
    def _effective_masks(masks: torch.Tensor, no_box: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(0/1 float masks, has_box per sample); with ``no_box='full'`` an empty mask becomes the whole image.

        Float, not bool: ``amax`` over a float mask is ~15x faster than ``any`` over a bool one on CPU, and the
        float mask is what ``lerp`` takes as its weight.
        """
        m = masks.float() if not masks.is_floating_point() else (masks > 0).float() if bool((masks.amax() > 1) | (masks.amin() < 0)) else masks
        has_box = m.flatten(1).amax(1) > 0
        if no_box == "full" and not bool(has_box.all()):
            m = m.clone()
            m[~has_box] = 1.0
        return m, has_box


class SupMixup(_BatchMix):
    """``x~ = lam M_A x_A + (1 - lam) M_B x_B``, ``y~ = lam y_A + (1 - lam) y_B`` on a batch; see module doc."""

    def __init__(self, alpha: float = 1.0, no_box: str = "skip", prob: float = 1.0):
        super().__init__(no_box, prob)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = alpha

    def randomize(self, has_box: torch.Tensor) -> None:
        self._lam = float(self.R.beta(self.alpha, self.alpha))
        self._pairs(has_box)

    def __call__(self, images, labels, masks, randomize: bool = True, _effective=None):
        prepared = self._prepare(images, labels, masks, randomize, _effective)
        if prepared is None:
            return images, labels
        m, src = prepared
        lam = self._lam
        m = m.to(images.dtype)
        mixed = lam * (images * m) + (1 - lam) * (images[src] * m[src])
        mixed_flag = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        mixed_flag[self._targets.to(images.device)] = True
        out = torch.where(mixed_flag.view(-1, 1, 1, 1), mixed, images)
        y = labels if labels.is_floating_point() else labels.float()
        y_mixed = lam * y + (1 - lam) * y[src]
        y_out = torch.where(mixed_flag.view(-1, *([1] * (y.ndim - 1))), y_mixed, y)
        return out, y_out


class SupCutmix(_BatchMix):
    """``x~ = M_A x_A + (1 - M_A) x_B``; ``y~ = y_A`` (``label_rule="paper"``) or area-weighted (``"area"``)."""

    def __init__(self, label_rule: str = "paper", no_box: str = "skip", prob: float = 1.0):
        super().__init__(no_box, prob)
        if label_rule not in ("paper", "area"):
            raise ValueError(f"label_rule must be 'paper' or 'area', got {label_rule!r}")
        self.label_rule = label_rule

    def randomize(self, has_box: torch.Tensor) -> None:
        self._pairs(has_box)

    def __call__(self, images, labels, masks, randomize: bool = True, _effective=None):
        prepared = self._prepare(images, labels, masks, randomize, _effective)
        if prepared is None:
            return images, labels
        m, src = prepared
        # lerp(x_B, x_A, M) is x_B where M = 0 and exactly x_A where M = 1 (torch computes end - diff * (1 - w)
        # for w >= 0.5); unmixed samples have src = self, so they come back unchanged whatever their mask
        out = images[src].lerp_(images, m.to(images.dtype))
        if self.label_rule == "paper":
            return out, labels
        y = labels if labels.is_floating_point() else labels.float()
        lam = m.flatten(1).float().mean(1)  # the real kept area of each sample's own box
        lam = torch.where(src == torch.arange(len(src), device=src.device), torch.ones_like(lam), lam)
        lam = lam.view(-1, *([1] * (y.ndim - 1)))
        return out, lam * y + (1 - lam) * y[src]


class _BatchMixd(Randomizable, MapTransform):
    def __init__(self, mixer, keys, label_key, mask_key, allow_missing_keys, mask_follow_keys=(BODY_MASK,)):
        super().__init__(keys, allow_missing_keys)
        self.mixer = mixer
        self.label_key = label_key
        self.mask_key = mask_key
        self.mask_follow_keys = (mask_follow_keys,) if isinstance(mask_follow_keys, str) else tuple(mask_follow_keys or ())

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.mixer.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.mixer.randomize(data)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for k in (self.label_key, self.mask_key):
            if k not in d:
                raise KeyError(f"{type(self).__name__}: missing key '{k}' (run BoxesToMaskd before collation)")
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        labels = d[self.label_key]
        labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
        masks = d[self.mask_key]
        _check_batch(d[keys[0]], labels, masks, keys[0], self.label_key, self.mask_key)
        effective = self.mixer._effective_masks(masks, self.mixer.no_box)  # once per batch, shared by all keys
        self.randomize(effective[1])
        new_labels = labels
        for key in keys:
            d[key], new_labels = self.mixer(d[key], labels, masks, randomize=False, _effective=effective)
        d[self.label_key] = new_labels
        for key in self.mask_follow_keys:  # binary masks mixed like the image, then: covered by a source's mask
            if isinstance(d.get(key), torch.Tensor):
                mixed, _ = self.mixer(d[key].float(), labels, masks, randomize=False, _effective=effective)
                d[key] = (mixed > 0).to(d[key].dtype)
        if isinstance(self.mixer, SupMixup) and self.mixer._targets.numel():
            # a mixed image shows both box regions: its mask (what guided training keeps relevance in) is the union
            m = effective[0]  # the masks the mix used (no_box="full": a box-less image counts whole)
            src = self.mixer._source.to(m.device)
            mixed = torch.zeros(m.shape[0], dtype=torch.bool, device=m.device)
            mixed[self.mixer._targets.to(m.device)] = True  # (with prob < 1 the others keep their own mask)
            d[self.mask_key] = torch.where(mixed.view(-1, 1, 1, 1), torch.maximum(m, m[src]), masks.to(m.dtype))
        return d


class SupMixupd(_BatchMixd):
    """Batch-level dictionary :class:`SupMixup` (after collation; in a ``prepare_batch`` or a batch transform).
    ``mask_follow_keys``: other binary masks of the image mixed with it (the module doc); absent keys are skipped."""

    def __init__(
        self,
        keys: KeysCollection = IMAGE,
        label_key: str = LABEL,
        mask_key: str = BOX_MASK,
        alpha: float = 1.0,
        no_box: str = "skip",
        allow_missing_keys: bool = False,
        mask_follow_keys: KeysCollection = (BODY_MASK,),
        prob: float = 1.0,
    ):
        super().__init__(SupMixup(alpha, no_box, prob), keys, label_key, mask_key, allow_missing_keys, mask_follow_keys)


class SupCutmixd(_BatchMixd):
    """Batch-level dictionary :class:`SupCutmix`; ``label_rule`` ``"paper"`` (``y~ = y_A``) or ``"area"``."""

    def __init__(
        self,
        keys: KeysCollection = IMAGE,
        label_key: str = LABEL,
        mask_key: str = BOX_MASK,
        label_rule: str = "paper",
        no_box: str = "skip",
        allow_missing_keys: bool = False,
        mask_follow_keys: KeysCollection = (BODY_MASK,),
        prob: float = 1.0,
    ):
        super().__init__(SupCutmix(label_rule, no_box, prob), keys, label_key, mask_key, allow_missing_keys, mask_follow_keys)


SupCutoutD = SupCutoutDict = SupCutoutd
SupMixupD = SupMixupDict = SupMixupd
SupCutmixD = SupCutmixDict = SupCutmixd
