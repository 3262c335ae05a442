"""Brixia lung zones from a lung mask: ``split_lung_zones`` (pure function), ``LungZones`` / ``LungZonesd``.

Seed paper (COVID severity ViT): the two lungs are separated by connected components, and each lung is cut at
5/12 and 2/3 of the way from its highest to its lowest mask row. The zone map is 0 outside the lungs and 1..6 in
the Brixia order: A/B/C = upper/middle/lower of the IMAGE-LEFT lung, D/E/F of the IMAGE-RIGHT lung.
When the two lungs touch (one component), the mask is split at the column with the fewest lung pixels in the
middle third of the mask's width (the midline gap), provided that column holds less than half the median column
height; otherwise the mask is taken to hold one lung, which is an error (or a flag). MONAI has no such transform; scikit-image labels components.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = ["LungZoneError", "split_lung_zones", "LungZones", "LungZonesd", "LungZonesD", "LungZonesDict"]

UPPER_CUT = 5.0 / 12.0
LOWER_CUT = 2.0 / 3.0


class LungZoneError(ValueError):
    """A lung mask that does not hold two lungs."""


def _two_lungs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from skimage.measure import label

    lab, n = label(mask, connectivity=2, return_num=True)
    if n == 0:
        raise LungZoneError("lung mask is empty")
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    if n >= 2 and sizes[order[1]] >= 0.1 * sizes[order[0]]:
        a, b = lab == order[0] + 1, lab == order[1] + 1
    else:
        # one merged component: split at the emptiest column of the middle third (the midline gap)
        big = lab == order[0] + 1
        cols = np.nonzero(big.any(axis=0))[0]
        c0, c1 = cols[0], cols[-1]
        lo, hi = c0 + (c1 - c0) // 3, c0 + 2 * (c1 - c0) // 3
        if hi <= lo:
            raise LungZoneError("lung mask holds a single lung")
        counts = big[:, lo : hi + 1].sum(axis=0)
        column_heights = big[:, c0 : c1 + 1].sum(axis=0)
        if counts.min() >= 0.5 * np.median(column_heights[column_heights > 0]):
            raise LungZoneError("lung mask holds a single lung (no midline gap to split at)")
        split = lo + int(np.argmin(counts))
        a, b = big.copy(), big.copy()
        a[:, split:] = False
        b[:, :split] = False
        if not a.any() or not b.any():
            raise LungZoneError("lung mask holds a single lung")
    # image-left lung first
    if np.nonzero(a.any(axis=0))[0].mean() > np.nonzero(b.any(axis=0))[0].mean():
        a, b = b, a
    return a, b


def split_lung_zones(mask, upper: float = UPPER_CUT, lower: float = LOWER_CUT) -> np.ndarray:
    """Zone map ``(H, W)`` uint8 (0 outside, 1..6 = A..F) from a binary lung mask ``(H, W)`` or ``(1, H, W)``.

    Row ``r`` of a lung spanning rows ``top..bottom`` is upper if ``r < top + upper * (bottom - top)``, lower if
    ``r >= top + lower * (bottom - top)``, middle otherwise.
    """
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"lung mask must be (H, W) or (1, H, W), got {m.shape}")
    m = m > 0
    zones = np.zeros(m.shape, dtype=np.uint8)
    rows = np.arange(m.shape[0])[:, None]
    for offset, lung in zip((0, 3), _two_lungs(m)):
        r = np.nonzero(lung.any(axis=1))[0]
        top, bottom = r[0], r[-1]
        cut1 = top + upper * (bottom - top)
        cut2 = top + lower * (bottom - top)
        z = np.where(rows < cut1, 1, np.where(rows >= cut2, 3, 2)) + offset
        zones[lung] = np.broadcast_to(z, m.shape)[lung]
    return zones


class LungZones(Transform):
    """Array transform: lung mask ``(1, H, W)`` -> zone map ``(1, H, W)`` (values 0..6).

    ``on_error="raise"`` raises :class:`LungZoneError` for a mask with one lung or none; ``"flag"`` returns an
    all-zero map instead (the dictionary version records the flag).
    """

    def __init__(self, on_error: str = "raise"):
        if on_error not in ("raise", "flag"):
            raise ValueError(f"on_error must be 'raise' or 'flag', got {on_error!r}")
        self.on_error = on_error

    def __call__(self, mask):
        try:
            zones = split_lung_zones(mask)
            ok = True
        except LungZoneError:
            if self.on_error == "raise":
                raise
            zones, ok = np.zeros(np.asarray(mask).shape[-2:], dtype=np.uint8), False
        out = torch.as_tensor(zones[None]) if isinstance(mask, torch.Tensor) else zones[None]
        return out, ok


class LungZonesd(MapTransform):
    """Dictionary wrapper of :class:`LungZones`: ``lung_mask`` -> ``zones``; errors name the file."""

    def __init__(
        self,
        keys: KeysCollection = "lung_mask",
        output_key: str = "zones",
        on_error: str = "raise",
        flag_key: str = "zones_ok",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.zoner = LungZones(on_error)
        self.output_key = output_key
        self.flag_key = flag_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[self.output_key], ok = self.zoner(d[key])
            except LungZoneError as e:
                meta = getattr(d[key], "meta", {}) or {}
                name = meta.get("filename_or_obj", d.get(f"{key}_path", key))
                raise LungZoneError(f"{name}: {e}") from e
            d[self.flag_key] = ok
        return d


LungZonesD = LungZonesDict = LungZonesd
