"""Losses of guided training (issue 13 groundwork): ISNet's background-relevance heatmap loss and GAIN's soft mask.

Pure functions of heatmaps, masks and attention maps (../shared/METHODS.md sections 1.5 and 2; ISNet Nat Commun /
Faster ISNet code), so the training step can combine them with the classification loss. What they add to MONAI and
zennit, which have neither: global weighted rank pooling over the background, the normalisation by the foreground
mean, the foreground-relevance band [C1, C2] with Faster ISNet's "hybrid" right-hand term (linear above
C1 + C2, branch chosen on a detached value), the band chosen from relevance statistics of plain epochs, and GAIN's
``T(A) = sigmoid(omega (A - sigma))`` erasing. Everything runs in float32 with autocast off, and a NaN loss raises.
"""

from __future__ import annotations

import math

import torch

__all__ = ["gwrp", "isnet_background_loss", "isnet_foreground_loss", "isnet_heatmap_loss", "choose_band",
           "gain_soft_mask", "gain_erase"]


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype != torch.float32 else t


def gwrp(values: torch.Tensor, decay: float) -> torch.Tensor:
    """Global weighted rank pooling over the last dimension: sort descending, ``sum_i d^i x_(i) / sum_i d^i``
    (``d = 0``: the maximum; ``d = 1``: the mean)."""
    if not 0 <= decay <= 1:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if decay == 0:
        return values.amax(dim=-1)  # no sort needed for the maximum
    x = values.sort(dim=-1, descending=True).values
    n = x.shape[-1]
    w = torch.pow(torch.as_tensor(float(decay), dtype=x.dtype, device=x.device), torch.arange(n, dtype=x.dtype, device=x.device))
    return (x * w).sum(-1) / w.sum()


def _broadcast_mask(mask: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """A binary mask ``(B, 1 | C, H, W)`` or ``(B, H, W)`` as ``(B, 1, 1 | C, H, W)`` against heat ``(B, K, C, H, W)``."""
    m = _float32(torch.as_tensor(mask, device=heat.device))
    if m.ndim == heat.ndim - 2:
        m = m.unsqueeze(1)
    if m.ndim == heat.ndim - 1:
        m = m.unsqueeze(1)
    if m.shape[-2:] != heat.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} and heatmaps {tuple(heat.shape)} differ in size: resize the mask first")
    if not torch.all((m == 0) | (m == 1)):
        raise ValueError("the mask must be binary (0 / 1)")
    return m


def _as_5d(heat: torch.Tensor) -> torch.Tensor:
    """Heatmaps as ``(B, K, C, H, W)``: ``(B, K, H, W)`` maps (channels summed, as ``lrp`` returns) get C = 1."""
    if heat.ndim == 4:
        return heat.unsqueeze(2)
    if heat.ndim != 5:
        raise ValueError(f"heatmaps must be (B, K, H, W) or (B, K, C, H, W), got {tuple(heat.shape)}")
    return heat


def isnet_background_loss(heat: torch.Tensor, mask: torch.Tensor, decay: float = 0.9, e: float = 1.0,
                          eps: float = 1e-8) -> torch.Tensor:
    """``L_B`` per image ``(B,)``: ``A = |H|`` divided by its mean over the foreground (per map), background scores
    ``g = GWRP_d(A (1 - M))`` per (b, k, c), ``-log(1 - min(g / (g + E), 1 - 1e-7))`` averaged over k and c."""
    with torch.autocast(device_type=heat.device.type, enabled=False):
        h = _as_5d(_float32(heat))
        m = _broadcast_mask(mask, h)
        a = h.abs()
        fg_mean = (a * m).sum(dim=(2, 3, 4), keepdim=True) / (m.expand_as(a).sum(dim=(2, 3, 4), keepdim=True) + eps)
        a = a / (fg_mean + eps)
        bg = (a * (1 - m)).flatten(3)  # (B, K, C, H*W)
        g = gwrp(bg, decay)
        loss = -torch.log(1 - torch.clamp(g / (g + e), max=1 - 1e-7))
        return loss.mean(dim=(1, 2))


def isnet_foreground_loss(heat: torch.Tensor, mask: torch.Tensor, c1: float, c2: float, mode: str = "hybrid") -> torch.Tensor:
    """``L_F`` per image ``(B,)``: keeps the foreground relevance ``F = sum |H| M`` (un-normalised) of each map in
    ``[C1, C2]``. Left term ``(min(F / C1, 1) - 1)^2``; right term ``((max(F, C2) - C2) / C1)^2`` (``"l2"``), or in
    ``"hybrid"`` (Faster ISNet) that square up to ``F = C1 + C2`` and ``(F - C1 - C2) + 1`` beyond it (the branch
    chosen on a detached F), averaged over the maps."""
    if not 0 < c1 <= c2:
        raise ValueError(f"need 0 < C1 <= C2, got C1={c1}, C2={c2}")
    if mode not in ("hybrid", "l2"):
        raise ValueError(f"mode must be 'hybrid' or 'l2', got {mode!r}")
    with torch.autocast(device_type=heat.device.type, enabled=False):
        h = _as_5d(_float32(heat))
        m = _broadcast_mask(mask, h)
        f = (h.abs() * m).sum(dim=(2, 3, 4))  # (B, K)
        left = (torch.clamp(f / c1, max=1) - 1) ** 2
        square = ((torch.clamp(f, min=c2) - c2) / c1) ** 2
        if mode == "l2":
            right = square
        else:
            right = torch.where(f.detach() <= c1 + c2, square, (f - c1 - c2) + 1)
        return (left + right).mean(dim=1)


def isnet_heatmap_loss(heat: torch.Tensor, mask: torch.Tensor, c1: float = 1.0, c2: float = 25.0, w1: float = 1.0,
                       w2: float = 1.0, decay: float = 0.0, e: float = 1.0, mode: str = "hybrid",
                       has_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``L_H = w1 L_B + w2 L_F`` averaged over the images that have a mask (``has_mask`` (B,) bool; images without
    one contribute nothing: 0 when none has). Faster ISNet's defaults: ``w1 = w2 = 1``, ``d = 0``, ``E = 1``,
    hybrid; the training loss is ``(1 - P) CE + P L_H`` with ``P = 0.7``."""
    if has_mask is not None:  # selected first: an image without a mask has no foreground mean to divide by
        keep = torch.as_tensor(has_mask, device=heat.device, dtype=torch.bool).reshape(-1)
        if not keep.any():
            return heat.sum() * 0.0
        heat, mask = heat[keep], torch.as_tensor(mask, device=heat.device)[keep]
    per = w1 * isnet_background_loss(heat, mask, decay=decay, e=e) + w2 * isnet_foreground_loss(heat, mask, c1, c2, mode)
    loss = per.mean()
    if not torch.isfinite(loss):
        raise FloatingPointError("the ISNet heatmap loss is not finite (check the heatmaps and the mask)")
    return loss


def choose_band(totals) -> tuple[float, float]:
    """Faster ISNet's ``returnCut``: from the total relevance ``sum |R|`` of each map over the last plain epoch
    (mean m, standard deviation s), ``C1 = max(m / 5, m - 3 s)`` and ``C2 = min(25 C1, m + 3 s)``."""
    t = torch.as_tensor(totals, dtype=torch.float64).reshape(-1)
    if t.numel() < 2:
        raise ValueError("choose_band needs the totals of at least two maps")
    m, s = float(t.mean()), float(t.std(unbiased=False))
    c1 = max(m / 5, m - 3 * s)
    c2 = min(25 * c1, m + 3 * s)
    if not (math.isfinite(c1) and c1 > 0):
        raise ValueError(f"relevance totals give no usable band (mean {m}, std {s})")
    return c1, max(c2, c1)


def gain_soft_mask(attention: torch.Tensor, sigma: float = 0.5, omega: float = 10.0) -> torch.Tensor:
    """GAIN's differentiable threshold ``T(A) = sigmoid(omega (A - sigma))`` of an attention map in [0, 1]."""
    return torch.sigmoid(omega * (attention - sigma))


def gain_erase(image: torch.Tensor, attention: torch.Tensor, sigma: float = 0.5, omega: float = 10.0,
               fill: float = 0.0) -> torch.Tensor:
    """GAIN's attention-mining input ``I* = I - T(A) (I - fill)``: the attended region moved to ``fill``
    (``fill = 0`` gives the paper's ``I - T(A) I``)."""
    t = gain_soft_mask(attention, sigma, omega)
    return image - t * (image - fill)
