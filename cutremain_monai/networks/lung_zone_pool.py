"""Lung-zone ROI max-pooling (COVID severity ViT paper): a lesion probability map and a Brixia zone map give the
maximum probability inside each of the six zones.

``prob: (B, 1, H, W)``, ``zones: (B, 1, H, W)`` integers 0..6 (0 = outside the lungs) -> ``(B, 6)`` in zone order
A..F, vectorised over the batch, with gradients flowing to the maxima (ties share the gradient, as ``torch.amax``
does). A zone with no pixel gives 0 and is reported (``return_empty=True``, and the module logs a warning and
keeps ``last_empty``). NaN inside a zone gives NaN for that zone.

Two implementations, same results (tested against each other):

- on CPU with float32 maps and uint8 zone maps (what ``LungZonesd`` makes), the fused C kernel
  ``_zone_pool`` (built by ``setup.py`` when a compiler is present): one pass per image over runs of equal zone
  values, vector max per run, images in parallel on ``torch.get_num_threads()`` threads - close to a whole-map
  ``amax`` in time, where ``scatter_reduce`` is about 40x slower (``benchmarks/bench_lung_zone_pool.py``);
- everywhere else (CUDA, other dtypes, no compiled kernel): one ``scatter_reduce(amax)`` over the flattened
  batch.

The backward pass of the kernel path is written with PyTorch ops and gives the gradient ``scatter_reduce`` gives.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["lung_zone_max_pool", "LungZoneMaxPool", "NUM_ZONES", "fused_kernel_available"]

logger = logging.getLogger(__name__)
NUM_ZONES = 6

try:  # optional compiled kernel (setup.py builds it when a C compiler is present)
    from cutremain_monai.networks import _zone_pool as _kernel
except ImportError:  # pragma: no cover - depends on the build machine
    _kernel = None


def fused_kernel_available() -> bool:
    """Whether the compiled CPU kernel is importable on this install."""
    return _kernel is not None


def _check(prob: torch.Tensor, zones: torch.Tensor) -> None:
    if prob.ndim == 4 and prob.shape[1] == 1 and zones.shape == prob.shape and zones.dtype == torch.uint8:
        return  # the common case, checked in one line (this runs every step)
    if prob.ndim != 4 or prob.shape[1] != 1:
        raise ValueError(f"prob must be (B, 1, H, W), got {tuple(prob.shape)}")
    if zones.shape != prob.shape:
        raise ValueError(f"zones must have the shape of prob {tuple(prob.shape)}, got {tuple(zones.shape)}")
    if zones.is_floating_point() or zones.is_complex():
        raise ValueError(f"zones must hold integers 0..{NUM_ZONES}, got dtype {zones.dtype}")


def _out_of_range() -> ValueError:
    return ValueError(f"zones must hold integers 0..{NUM_ZONES}; found a value outside that range")


def _scatter_pool(prob: torch.Tensor, zones: torch.Tensor) -> torch.Tensor:
    """``(B, 7)`` per-zone maxima (column 0 = outside the lungs), -inf where a zone is empty."""
    b = prob.shape[0]
    index = zones.reshape(b, -1)
    index = index if index.dtype == torch.int64 else index.long()
    if index.device.type == "cpu" and index.numel():
        lo, hi = torch.aminmax(index)
        if int(lo) < 0 or int(hi) > NUM_ZONES:
            raise _out_of_range()
    # start from -inf: a zone that receives no pixel stays -inf, which marks it empty without a counting pass
    out = torch.full((b, NUM_ZONES + 1), float("-inf"), dtype=prob.dtype, device=prob.device)
    return out.scatter_reduce(1, index, prob.reshape(b, -1), reduce="amax", include_self=False)


def _kernel_pool(prob: torch.Tensor, zones: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, _, h, w = prob.shape
    p = prob if prob.is_contiguous() else prob.contiguous()
    z = zones if zones.is_contiguous() else zones.contiguous()
    out = torch.empty((b, NUM_ZONES), dtype=torch.float32)
    empty = torch.empty((b, NUM_ZONES), dtype=torch.bool)
    bad = _kernel.zone_max_u8(p.data_ptr(), z.data_ptr(), b, h * w, NUM_ZONES, out.data_ptr(), empty.data_ptr(),
                              min(torch.get_num_threads(), b) or 1)
    if bad:
        raise _out_of_range()
    return out, empty


class _ZoneMaxKernel(torch.autograd.Function):
    """Kernel forward; backward sends each zone's gradient to its maximal pixels, shared among ties."""

    @staticmethod
    def forward(ctx, prob, zones):
        pooled, empty = _kernel_pool(prob, zones)
        ctx.save_for_backward(prob, zones, pooled, empty)
        ctx.mark_non_differentiable(empty)
        return pooled, empty

    @staticmethod
    def backward(ctx, grad_pooled, _grad_empty):
        prob, zones, pooled, empty = ctx.saved_tensors
        b = prob.shape[0]
        index = zones.reshape(b, -1).long()
        flat = prob.reshape(b, -1)
        # column 0 (outside the lungs) and empty zones get NaN, which no pixel equals
        nan = torch.full((b, 1), float("nan"), dtype=prob.dtype)
        full = torch.cat([nan, pooled.masked_fill(empty, float("nan"))], dim=1)
        hit = (flat == full.gather(1, index)).to(prob.dtype)
        count = torch.zeros_like(full).scatter_add_(1, index, hit).clamp_min_(1.0)
        grad_full = torch.cat([torch.zeros_like(nan), grad_pooled], dim=1)
        grad = hit * (grad_full / count).gather(1, index)
        return grad.reshape(prob.shape), None


def _use_kernel(prob: torch.Tensor, zones: torch.Tensor) -> bool:
    return (
        _kernel is not None
        and prob.is_cpu
        and zones.is_cpu
        and prob.dtype == torch.float32
        and zones.dtype == torch.uint8
    )


def lung_zone_max_pool(prob: torch.Tensor, zones: torch.Tensor, return_empty: bool = False,
                       use_kernel: bool | None = None):
    """Per-zone maximum of ``prob``; see the module docstring for shapes. Empty zones give 0.

    ``use_kernel``: ``None`` picks the compiled CPU kernel where it applies, ``False`` forces ``scatter_reduce``,
    ``True`` requires the kernel (an error where it does not apply).
    """
    _check(prob, zones)
    applies = _use_kernel(prob, zones)
    if use_kernel and not applies:
        raise RuntimeError("the fused zone-pool kernel needs float32 maps and uint8 zones on the CPU, and a build "
                           f"with the compiled kernel (available: {fused_kernel_available()})")
    if applies and use_kernel is not False:
        if prob.requires_grad and torch.is_grad_enabled():
            pooled, empty = _ZoneMaxKernel.apply(prob, zones)
        else:
            pooled, empty = _kernel_pool(prob, zones)
        return (pooled, empty) if return_empty else pooled
    pooled = _scatter_pool(prob, zones)[:, 1:]
    empty = pooled == float("-inf")
    pooled = torch.where(empty, torch.zeros((), dtype=prob.dtype, device=prob.device), pooled)
    return (pooled, empty) if return_empty else pooled


class LungZoneMaxPool(nn.Module):
    """``nn.Module`` around :func:`lung_zone_max_pool`; ``last_empty`` is the ``(B, 6)`` mask of empty zones."""

    def __init__(self, warn_empty: bool = True, use_kernel: bool | None = None):
        super().__init__()
        self.warn_empty = warn_empty
        self.use_kernel = use_kernel
        self.last_empty: torch.Tensor | None = None

    def forward(self, prob: torch.Tensor, zones: torch.Tensor) -> torch.Tensor:
        pooled, empty = lung_zone_max_pool(prob, zones, return_empty=True, use_kernel=self.use_kernel)
        self.__dict__["last_empty"] = empty  # a plain attribute: skips nn.Module's parameter/buffer bookkeeping
        if self.warn_empty and bool(empty.any()):
            logger.warning("LungZoneMaxPool: %d empty zone(s) in the batch (pooled as 0)", int(empty.sum()))
        return pooled
