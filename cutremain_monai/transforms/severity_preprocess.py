"""Preprocessing of the COVID severity pipeline: the seed paper's 3x3 Gaussian blur, and lung-mask binarisation.

The paper resizes to 256x256, blurs with a 3x3 Gaussian kernel, equalises the histogram and normalises. MONAI has
the resize (``Resized``), the histogram equalisation (``HistogramNormalized``) and the normalisation
(``NormalizeIntensityd``), which the bundle uses directly. What MONAI lacks:

- ``GaussianBlur3x3``: MONAI's ``GaussianSmooth`` sizes its kernel from sigma (radius ``4 sigma``), so it cannot
  give the paper's 3-tap kernel. This is OpenCV's ``GaussianBlur(ksize=3, sigma=0)`` kernel, ``[1, 2, 1] / 4``
  separable (sigma 0.8 per OpenCV's rule), with edge pixels replicated (OpenCV reflects; on a 3x3 kernel with
  replicate vs reflect-101 the border rows differ, documented and tested).
- ``LungMask``: lung masks to {0, 1}. The V7 Labs masks of the COVID data mark lung as 255 and burned-in markup
  or devices as 127 (NOT lung); a loader that scales 8-bit masks to [0, 1] turns them into 1.0 and ~0.5, so the
  lung is ``value >= threshold`` with the default threshold 0.75, not ``value > 0``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

__all__ = ["GaussianBlur3x3", "GaussianBlur3x3d", "LungMask", "LungMaskd"]

_KERNEL_1D = torch.tensor([0.25, 0.5, 0.25])


class GaussianBlur3x3(Transform):
    """``(C, H, W)`` -> the same shape, each channel convolved with ``[1,2,1]^T [1,2,1] / 16`` (replicate edges)."""

    def __call__(self, img):
        t = torch.as_tensor(img)
        if t.ndim != 3:
            raise ValueError(f"GaussianBlur3x3 expects (C, H, W), got shape {tuple(t.shape)}")
        x = t.float()[:, None]  # (C, 1, H, W)
        k = _KERNEL_1D.to(x)
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        x = F.conv2d(x, k.reshape(1, 1, 1, 3))
        x = F.conv2d(x, k.reshape(1, 1, 3, 1))[:, 0].to(t.dtype)
        if isinstance(img, MetaTensor):
            return MetaTensor(x, meta=img.meta, applied_operations=img.applied_operations)
        return x


class GaussianBlur3x3d(MapTransform):
    """Dictionary wrapper of :class:`GaussianBlur3x3`."""

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.blur = GaussianBlur3x3()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.blur(d[key])
        return d


class LungMask(Transform):
    """A lung mask scaled to [0, 1] -> float {0, 1}: ``value >= threshold`` (see module doc for why not ``> 0``)."""

    def __init__(self, threshold: float = 0.75):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold

    def __call__(self, mask):
        t = torch.as_tensor(mask)
        if t.is_floating_point() and float(t.max()) > 1.0 + 1e-6:
            raise ValueError(f"lung mask must be scaled to [0, 1] (max {float(t.max()):.1f}); load it with LoadXrayd")
        out = (t >= self.threshold).to(torch.float32)
        if isinstance(mask, MetaTensor):
            return MetaTensor(out, meta=mask.meta, applied_operations=mask.applied_operations)
        return out


class LungMaskd(MapTransform):
    """Dictionary wrapper of :class:`LungMask`."""

    def __init__(self, keys: KeysCollection = "lung_mask", threshold: float = 0.75, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.binarise = LungMask(threshold)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.binarise(d[key])
        return d
