"""The Brixia zone geometry of a lung mask (a pure function on arrays): the two lungs separated by connected
components, each cut at 5/12 and 2/3 of the way from its highest to its lowest mask row; the zone map is 0 outside
the lungs and 1..6 in the Brixia order (A/B/C = upper/middle/lower of the IMAGE-LEFT lung, D/E/F of the
IMAGE-RIGHT lung). When the two lungs touch (one component), the mask is split at the column with the fewest lung
pixels in the middle third of the mask's width (the midline gap), provided that column holds less than half the
median column height; otherwise the mask is taken to hold one lung, which is an error.

Used by :mod:`cutremain_monai.transforms.lung_zones` (the MONAI transforms) and by the COVID phantoms of
:mod:`cutremain_monai.data.phantoms`. MONAI has no such rule; scikit-image labels the components.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.measure import label

__all__ = ["UPPER_CUT", "LOWER_CUT", "LungZoneError", "split_lung_zones"]

UPPER_CUT = 5.0 / 12.0
LOWER_CUT = 2.0 / 3.0


class LungZoneError(ValueError):
    """A lung mask that does not hold two lungs."""


def _two_lungs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
