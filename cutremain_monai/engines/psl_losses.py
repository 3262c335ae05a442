"""Losses of the lesion-segmentation stage: PSL's cross-entropy on pseudo-masks and SEC's seed / expand / constrain
terms (Kolesnikov & Lampert, ECCV 2016; both in the seed 002 slides, ../shared/METHODS.md section 3).

Shapes: ``log_probs`` ``(B, K, H, W)`` with ``K = C + 1`` (channel 0 background), log of probabilities that sum to
1 over channels at each pixel; ``labels`` ``(B, H, W)`` long, values in ``0 .. C`` or :data:`IGNORE`;
``image_labels`` ``(B, C)`` in {0, 1}; ``image`` ``(B, 1, H, W)``.

- :func:`seed_loss`: ``-(1 / sum_c |S_c|) sum_c sum_{u in S_c} log f_{u,c}`` over the labelled ("seed") pixels,
  ignore left out. On PSL's class-weighted probabilities this is PSL's cross-entropy; on plain probabilities it is
  SEC's seeding loss (the pseudo-mask's background pixels are the background seeds).
- :func:`global_weighted_rank_pool`: ``G_c(f; d) = sum_j d^(j-1) f_(j),c / sum_j d^(j-1)``, ``f_(1),c >= f_(2),c
  >= ...`` the pixels' class-c probabilities sorted in descending order (``d = 0``: max pooling, ``d = 1``: mean).
- :func:`expand_loss`: ``-(1/|T|) sum_{c in T} log G_c(d+) - (1/|C \\ T|) sum_{c not in T} log(1 - G_c(d-)) -
  log G_bg(d_bg)``, ``T`` the image's classes; the decays default to SEC's (``d+ = 0.996``, ``d- = 0``, ``d_bg =
  0.999``, as recalled from the paper). Averaged over the batch; a mean over an empty ``T`` contributes 0.
- :func:`constrain_loss`: ``(1/n) sum_u sum_c Q_{u,c} log(Q_{u,c} / f_{u,c})``. SEC takes ``Q`` from a dense CRF
  of the prediction on the image; here ``Q`` is :func:`guided_filter` of each probability map with the image as the
  guide (He, Sun & Tang, ECCV 2010 / TPAMI 2013: an edge-preserving smoothing with box filters, O(HW) and
  differentiable; no CRF library is needed), clamped at 0 and renormalised, and held constant (no gradient), as
  SEC holds the CRF output.

What this adds to MONAI's losses: none of these are in MONAI (its ``DiceCELoss`` has no ignore label and no
image-level terms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cutremain_monai.constants import IGNORE_LABEL

__all__ = ["IGNORE", "seed_loss", "global_weighted_rank_pool", "expand_loss", "guided_filter", "constrain_loss",
           "PSLLoss"]

IGNORE = IGNORE_LABEL


def _check(log_probs: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if log_probs.ndim != 4:
        raise ValueError(f"log_probs must be (B, C+1, H, W), got {tuple(log_probs.shape)}")
    if labels is not None and (labels.ndim != 3 or labels.shape[0] != log_probs.shape[0]
                               or labels.shape[-2:] != log_probs.shape[-2:]):
        raise ValueError(f"labels must be (B, H, W) = {(log_probs.shape[0], *log_probs.shape[-2:])}, got {tuple(labels.shape)}")


def seed_loss(log_probs: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean ``-log f`` of the labelled class over all labelled pixels of the batch (0 when none is labelled)."""
    _check(log_probs, labels)
    labels = labels.long()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= log_probs.shape[1]))
    if bool(bad.any()):
        raise ValueError(f"labels hold values outside 0..{log_probs.shape[1] - 1} and {ignore_index}: "
                         f"{sorted(set(labels[bad].tolist()))[:5]}")
    if not bool((labels != ignore_index).any()):
        return log_probs.sum() * 0.0
    return F.nll_loss(log_probs, labels, ignore_index=ignore_index, reduction="mean")


def global_weighted_rank_pool(probs: torch.Tensor, decay: float) -> torch.Tensor:
    """``(B, K, H, W)`` -> ``(B, K)``: global weighted rank pooling with decay ``d`` (module doc)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    flat = probs.flatten(2)
    ordered = flat.sort(dim=2, descending=True).values
    n = ordered.shape[2]
    w = torch.ones(n, dtype=ordered.dtype, device=ordered.device)
    if decay < 1.0:
        w = torch.pow(torch.as_tensor(decay, dtype=ordered.dtype, device=ordered.device), torch.arange(n, device=ordered.device, dtype=ordered.dtype))
        if decay == 0.0:
            w = torch.zeros_like(w)
            w[0] = 1.0
    return (ordered * w).sum(2) / w.sum()


def expand_loss(log_probs: torch.Tensor, image_labels: torch.Tensor, d_pos: float = 0.996, d_neg: float = 0.0,
                d_bg: float = 0.999, eps: float = 1e-6) -> torch.Tensor:
    """SEC's expansion loss (module doc); ``image_labels`` ``(B, C)``."""
    _check(log_probs)
    probs = log_probs.exp()
    y = image_labels.float().reshape(probs.shape[0], -1)
    if y.shape[1] != probs.shape[1] - 1:
        raise ValueError(f"image_labels must be (B, {probs.shape[1] - 1}), got {tuple(image_labels.shape)}")
    fg = probs[:, 1:]
    g_pos = global_weighted_rank_pool(fg, d_pos).clamp(eps, 1 - eps)
    g_neg = global_weighted_rank_pool(fg, d_neg).clamp(eps, 1 - eps)
    g_bg = global_weighted_rank_pool(probs[:, :1], d_bg).clamp(eps, 1 - eps)[:, 0]
    present, absent = (y > 0.5).float(), (y <= 0.5).float()
    pos = -(present * g_pos.log()).sum(1) / present.sum(1).clamp_min(1)
    neg = -(absent * torch.log1p(-g_neg)).sum(1) / absent.sum(1).clamp_min(1)
    return (pos + neg - g_bg.log()).mean()


def _box(x: torch.Tensor, r: int) -> torch.Tensor:
    return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int = 4, eps: float = 1e-3) -> torch.Tensor:
    """He et al.'s guided filter: ``guide`` ``(B, 1, H, W)``, ``src`` ``(B, K, H, W)`` -> ``(B, K, H, W)``.

    ``a = cov(I, p) / (var(I) + eps)``, ``b = mean(p) - a mean(I)`` in each ``(2r+1)^2`` window, output
    ``mean(a) I + mean(b)`` (windows cut at the border, averaged over the pixels inside)."""
    if guide.ndim != 4 or guide.shape[1] != 1 or src.ndim != 4 or src.shape[-2:] != guide.shape[-2:]:
        raise ValueError(f"guide must be (B, 1, H, W) and src (B, K, H, W) of the same size; got {tuple(guide.shape)}, "
                         f"{tuple(src.shape)}")
    if radius < 1 or eps <= 0:
        raise ValueError(f"radius must be >= 1 and eps > 0, got {radius}, {eps}")
    guide, src = guide.float(), src.float()
    mean_i, mean_p = _box(guide, radius), _box(src, radius)
    cov = _box(guide * src, radius) - mean_i * mean_p
    var = _box(guide * guide, radius) - mean_i * mean_i
    a = cov / (var + eps)
    b = mean_p - a * mean_i
    return _box(a, radius) * guide + _box(b, radius)


def constrain_loss(log_probs: torch.Tensor, image: torch.Tensor, radius: int = 4, eps: float = 1e-3) -> torch.Tensor:
    """SEC's constrain-to-boundary term with the guided filter in place of the CRF (module doc)."""
    _check(log_probs)
    with torch.no_grad():
        q = guided_filter(image, log_probs.exp(), radius, eps).clamp_min(0) + 1e-8
        q = q / q.sum(1, keepdim=True)
    return (q * (q.log() - log_probs)).sum(1).mean()


class PSLLoss(torch.nn.Module):
    """The lesion-segmentation objective: ``seed_loss`` on the class-weighted log-probabilities (PSL's cross-entropy
    with the pseudo-mask), plus ``cls_weight`` x BCE of the classification head on the image labels, plus, with
    ``sec=True``, ``expand_weight`` x :func:`expand_loss` and ``constrain_weight`` x :func:`constrain_loss`.
    ``forward`` returns ``(total, {term: value})``."""

    def __init__(self, cls_weight: float = 1.0, sec: bool = False, expand_weight: float = 1.0,
                 constrain_weight: float = 1.0, d_pos: float = 0.996, d_neg: float = 0.0, d_bg: float = 0.999,
                 filter_radius: int = 4, filter_eps: float = 1e-3) -> None:
        super().__init__()
        self.cls_weight, self.sec = float(cls_weight), bool(sec)
        self.expand_weight, self.constrain_weight = float(expand_weight), float(constrain_weight)
        self.decays = (d_pos, d_neg, d_bg)
        self.filter = (int(filter_radius), float(filter_eps))

    def forward(self, log_probs, class_logits, labels, image_labels, image):
        terms = {"seed": seed_loss(log_probs, labels)}
        y = image_labels.float().reshape(class_logits.shape)
        terms["cls"] = F.binary_cross_entropy_with_logits(class_logits.float(), y)
        total = terms["seed"] + self.cls_weight * terms["cls"]
        if self.sec:
            terms["expand"] = expand_loss(log_probs, y, *self.decays)
            terms["constrain"] = constrain_loss(log_probs, image, *self.filter)
            total = total + self.expand_weight * terms["expand"] + self.constrain_weight * terms["constrain"]
        return total, terms
