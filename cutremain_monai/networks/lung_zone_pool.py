"""Lung-zone ROI max-pooling (COVID severity ViT paper): a lesion probability map and a Brixia zone map give the
maximum probability inside each of the six zones.

``prob: (B, 1, H, W)``, ``zones: (B, 1, H, W)`` integers 0..6 (0 = outside the lungs) -> ``(B, 6)`` in zone order
A..F, vectorised over the batch: one ``scatter_reduce(amax)`` over the flattened maps, on any device and dtype.

What this adds over calling ``scatter_reduce`` directly:

- checks with clear errors: shapes, an integer zone map, and (on CPU) zone values outside 0..6, which
  ``scatter_reduce`` reports only as an index out of bounds for a size-7 dimension; on CUDA the range check is
  skipped (it would synchronise the device every step) and a bad value is a device-side assert;
- empty zones: the reduction starts from ``-inf`` (``include_self=False``), so a zone with no pixel is found
  without a counting pass; it is pooled as 0 and reported (``return_empty=True``; the module logs a warning and
  keeps ``last_empty``);
- the outside-the-lungs column is dropped.

Kept from ``scatter_reduce``: NaN inside a zone gives NaN for that zone, and the gradient flows to each zone's
maximal pixels, shared equally among ties (as ``torch.amax`` does).

A fused C kernel (OpenMP, built by ``setup.py``) used to replace ``scatter_reduce`` on CPU. It was removed: it
was tuned against a bare ``amax``; measured against a SeverityViT training step (2 CPU threads) it gave no
measurable end-to-end gain: ViT-B/16 sizes, 256 px, batch 16: pooling forward + backward 3.0 ms with the kernel vs
6.4 ms with ``scatter_reduce``, against a fastest step of 21.1 s vs 20.6 s (the saving is 0.02% of a step); SMALL
sizes, 128 px, batch 8: fastest step 0.477 s vs 0.474 s. ``benchmarks/bench_lung_zone_pool.py`` now reports the
pooling's share of a training step.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["lung_zone_max_pool", "LungZoneMaxPool", "NUM_ZONES"]

logger = logging.getLogger(__name__)
NUM_ZONES = 6


def _check(prob: torch.Tensor, zones: torch.Tensor) -> None:
    if prob.ndim == 4 and prob.shape[1] == 1 and zones.shape == prob.shape and zones.dtype == torch.uint8:
        return  # the common case, checked in one line (this runs every step)
    if prob.ndim != 4 or prob.shape[1] != 1:
        raise ValueError(f"prob must be (B, 1, H, W), got {tuple(prob.shape)}")
    if zones.shape != prob.shape:
        raise ValueError(f"zones must have the shape of prob {tuple(prob.shape)}, got {tuple(zones.shape)}")
    if zones.is_floating_point() or zones.is_complex():
        raise ValueError(f"zones must hold integers 0..{NUM_ZONES}, got dtype {zones.dtype}")


def _scatter_pool(prob: torch.Tensor, zones: torch.Tensor) -> torch.Tensor:
    """``(B, 7)`` per-zone maxima (column 0 = outside the lungs), -inf where a zone is empty."""
    b = prob.shape[0]
    index = zones.reshape(b, -1)
    index = index if index.dtype == torch.int64 else index.long()
    if index.device.type == "cpu" and index.numel():
        lo, hi = torch.aminmax(index)
        if int(lo) < 0 or int(hi) > NUM_ZONES:
            raise ValueError(f"zones must hold integers 0..{NUM_ZONES}; found a value outside that range "
                             f"(min {int(lo)}, max {int(hi)})")
    # start from -inf: a zone that receives no pixel stays -inf, which marks it empty without a counting pass
    out = torch.full((b, NUM_ZONES + 1), float("-inf"), dtype=prob.dtype, device=prob.device)
    return out.scatter_reduce(1, index, prob.reshape(b, -1), reduce="amax", include_self=False)


def lung_zone_max_pool(prob: torch.Tensor, zones: torch.Tensor, return_empty: bool = False):
    """Per-zone maximum of ``prob``; see the module docstring for shapes. Empty zones give 0.

    ``return_empty=True`` returns ``(pooled, empty)``, ``empty`` the ``(B, 6)`` boolean mask of zones without a
    pixel.
    """
    _check(prob, zones)
    pooled = _scatter_pool(prob, zones)[:, 1:]
    empty = pooled == float("-inf")
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
        self.__dict__["last_empty"] = empty  # a plain attribute: skips nn.Module's parameter/buffer bookkeeping
        if self.warn_empty and bool(empty.any()):
            logger.warning("LungZoneMaxPool: %d empty zone(s) in the batch (pooled as 0)", int(empty.sum()))
        return pooled
