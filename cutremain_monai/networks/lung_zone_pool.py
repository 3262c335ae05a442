"""Lung-zone ROI max-pooling (COVID severity ViT paper): a lesion probability map and a Brixia zone map give the
maximum probability inside each of the six zones.

``prob: (B, 1, H, W)``, ``zones: (B, 1, H, W)`` integers 0..6 (0 = outside the lungs) -> ``(B, 6)`` in zone order
A..F. One ``scatter_reduce(amax)`` over the flattened batch: a single pass over the map, vectorised over the
batch, with gradients flowing to the maxima (ties share the gradient, as ``torch.amax`` does). A zone with no
pixel gives 0 and is reported (``return_empty=True``, and the module logs a warning and keeps ``last_empty``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["lung_zone_max_pool", "LungZoneMaxPool", "NUM_ZONES"]

logger = logging.getLogger(__name__)
NUM_ZONES = 6


def lung_zone_max_pool(prob: torch.Tensor, zones: torch.Tensor, return_empty: bool = False):
    """Per-zone maximum of ``prob``; see the module docstring for shapes. Empty zones give 0."""
    if prob.ndim != 4 or prob.shape[1] != 1:
        raise ValueError(f"prob must be (B, 1, H, W), got {tuple(prob.shape)}")
    if zones.shape != prob.shape:
        raise ValueError(f"zones must have the shape of prob {tuple(prob.shape)}, got {tuple(zones.shape)}")
    if zones.is_floating_point():
        raise ValueError(f"zones must hold integers 0..{NUM_ZONES}, got dtype {zones.dtype}")
    b = prob.shape[0]
    index = zones.reshape(b, -1)
    index = index if index.dtype == torch.int64 else index.long()
    # start from -inf: a zone that receives no pixel stays -inf, which marks it empty without a counting pass
    out = torch.full((b, NUM_ZONES + 1), float("-inf"), dtype=prob.dtype, device=prob.device)
    out = out.scatter_reduce(1, index, prob.reshape(b, -1), reduce="amax", include_self=False)
    pooled = out[:, 1:]
    empty = torch.isinf(pooled) & (pooled < 0)
    pooled = torch.where(empty, torch.zeros((), dtype=prob.dtype, device=prob.device), pooled)
    return (pooled, empty) if return_empty else pooled


class LungZoneMaxPool(nn.Module):
    """``nn.Module`` around :func:`lung_zone_max_pool`; ``last_empty`` is the ``(B, 6)`` mask of empty zones."""

    def __init__(self, warn_empty: bool = True):
        super().__init__()
        self.warn_empty = warn_empty
        self.last_empty: torch.Tensor | None = None

    def forward(self, prob: torch.Tensor, zones: torch.Tensor) -> torch.Tensor:
        pooled, empty = lung_zone_max_pool(prob, zones, return_empty=True)
        self.last_empty = empty
        if self.warn_empty and bool(empty.any()):
            logger.warning("LungZoneMaxPool: %d empty zone(s) in the batch (pooled as 0)", int(empty.sum()))
        return pooled
