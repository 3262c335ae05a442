"""Min-max normalisation of a map: the one rule every map display, region miner and metric uses.

A map (CAM, Grad-CAM, LRP, targetness, a segmentation probability, or an image shown under a heat map) is shifted
and scaled to ``[0, 1]``; a constant map (no information about where the model looked) becomes all zeros rather
than NaN, so it points nowhere. numpy and torch inputs alike; the result is a float64 numpy array.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_array", "normalise_map", "is_flat"]


def as_array(m, dtype=np.float64) -> np.ndarray:
    """``m`` (numpy array, torch tensor on any device, nested list) as a numpy array of ``dtype``."""
    return np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m, dtype=dtype)


def is_flat(m) -> bool:
    """True when the map is constant (max - min <= 1e-12 relative to its largest magnitude)."""
    a = as_array(m)
    hi, lo = float(a.max()), float(a.min())
    return hi - lo <= 1e-12 * max(1.0, abs(hi))


def normalise_map(m) -> np.ndarray:
    """Min-max normalised copy of a map as float64 (a constant map -> zeros)."""
    a = as_array(m)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
