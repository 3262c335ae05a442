"""Sliding-window targetness maps of a patch classifier (background learning, seed 003; ../shared/METHODS.md 4).

A binary patch classifier (one logit, sigmoid = P(target)) scores every ``window x window`` window of an image at
``stride``; each pixel accumulates the scores of the windows that cover it; the accumulated map, min-max
normalised per image, is the targetness map. All windows of an image are cut with ``unfold`` and scored in
batched forwards of ``batch_size`` windows (no Python loop over windows); the accumulation is ``fold``.

Accumulation (``normalise``):

* ``"coverage"`` (default): the per-pixel sum divided by the number of windows covering the pixel, i.e. the mean
  score of the covering windows. Coverage runs from 1 window at a corner to ``(window / stride)^2`` (36 for 48 /
  8) inside, so a plain sum makes the borders look like background whatever the image shows.
* ``"sum"``: the seed's plain sum ``c(x) = sum_{w covers x} s_w`` (its text), border bias included.

``accumulate="background"`` sums the backgroundness ``b_w = 1 - p_w`` instead, as the seed writes it, and the map
is then ``(M - c) / (M - m)`` (so that high still means target): with ``"coverage"`` this is the same map as
``"target"``; with ``"sum"`` it is not (the sum of ``1 - p`` also counts the windows, so the bias is reversed).
Pixels no window covers (when ``(H - window) % stride != 0``, the last rows / columns) get 0, the map's minimum;
an image whose windows all score the same gets an all-zero map.

What this adds: MONAI's ``SlidingWindowInferer`` stitches a segmentation network's dense outputs; it has no
notion of one score per window spread over the window's pixels, of coverage normalisation or of the
backgroundness form.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.inferers import Inferer

__all__ = ["targetness_map", "window_scores", "accumulate_windows", "TargetnessInferer"]


def _grid(size: int, window: int, stride: int) -> int:
    if size < window:
        raise ValueError(f"the image ({size} px) is smaller than the window ({window} px)")
    return (size - window) // stride + 1


def window_scores(model: torch.nn.Module, x: torch.Tensor, window: int = 48, stride: int = 8,
                  batch_size: int = 1024, logits: bool = False) -> torch.Tensor:
    """``P(target)`` of every window (``logits=True``: the raw logits): ``x (B, C, H, W)`` -> ``(B, gh, gw)``,
    row-major over the window grid."""
    if x.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    gh, gw = _grid(h, window, stride), _grid(w, window, stride)
    cols = F.unfold(x, kernel_size=window, stride=stride)  # (B, C*window*window, L)
    patches = cols.transpose(1, 2).reshape(b * gh * gw, c, window, window)
    out = []
    with torch.no_grad():
        for i in range(0, len(patches), batch_size):
            raw = model(patches[i : i + batch_size])
            if raw.ndim != 2 or raw.shape[1] != 1:
                raise ValueError(f"the patch classifier must return one logit per window (N, 1), got {tuple(raw.shape)}")
            out.append(raw.float()[:, 0])
    scores = torch.cat(out).reshape(b, gh, gw)
    return scores if logits else torch.sigmoid(scores)


def accumulate_windows(scores: torch.Tensor, image_size, window: int = 48, stride: int = 8,
                       normalise: Literal["coverage", "sum"] = "coverage",
                       accumulate: Literal["target", "background"] = "target", minmax: bool = True) -> torch.Tensor:
    """Window scores ``(B, gh, gw)`` (``P(target)``) -> min-max normalised targetness maps ``(B, H, W)`` in [0, 1]
    (see the module docstring for the two options). ``minmax=False``: the accumulated map before normalisation
    (``"coverage"``: the mean ``P(target)`` of the windows covering each pixel, comparable between images; 0 where
    no window covers), for an image-level score."""
    if normalise not in ("coverage", "sum"):
        raise ValueError(f"normalise must be 'coverage' or 'sum', got {normalise!r}")
    if accumulate not in ("target", "background"):
        raise ValueError(f"accumulate must be 'target' or 'background', got {accumulate!r}")
    b, gh, gw = scores.shape
    h, w = int(image_size[0]), int(image_size[1])
    if (_grid(h, window, stride), _grid(w, window, stride)) != (gh, gw):
        raise ValueError(f"{gh}x{gw} window scores do not fit a {h}x{w} image with window {window}, stride {stride}")
    s = scores.float() if accumulate == "target" else 1 - scores.float()
    cols = s.reshape(b, 1, gh * gw).expand(b, window * window, gh * gw)
    total = F.fold(cols, output_size=(h, w), kernel_size=window, stride=stride)[:, 0]
    coverage = F.fold(torch.ones_like(cols[:1]), output_size=(h, w), kernel_size=window, stride=stride)[:, 0]
    covered = coverage > 0
    c = torch.where(covered, total / coverage.clamp_min(1), torch.zeros_like(total)) if normalise == "coverage" else total
    if not minmax:
        return c if accumulate == "target" else torch.where(covered, coverage - c if normalise == "sum" else 1 - c, c)
    flat = c.masked_fill(~covered, float("nan")).flatten(1)
    lo = torch.nan_to_num(flat, nan=float("inf")).amin(1).view(b, 1, 1)
    hi = torch.nan_to_num(flat, nan=float("-inf")).amax(1).view(b, 1, 1)
    span = (hi - lo).clamp_min(1e-12)
    m = (c - lo) / span if accumulate == "target" else (hi - c) / span
    m = torch.where(covered, m, torch.zeros_like(m))  # uncovered pixels: the minimum
    return torch.where((hi - lo) > 1e-12, m, torch.zeros_like(m)).clamp(0, 1)


def targetness_map(model: torch.nn.Module, x: torch.Tensor, window: int = 48, stride: int = 8, batch_size: int = 1024,
                   normalise: Literal["coverage", "sum"] = "coverage",
                   accumulate: Literal["target", "background"] = "target", minmax: bool = True) -> torch.Tensor:
    """Targetness maps ``(B, 1, H, W)`` in [0, 1] of ``x (B, C, H, W)`` (or ``(C, H, W)``) under the patch
    classifier ``model`` (put in eval mode here and restored); ``minmax=False``: before normalisation."""
    single = x.ndim == 3
    x = x[None] if single else x
    was_training = model.training
    model.eval()
    try:
        scores = window_scores(model, x, window, stride, batch_size)
    finally:
        model.train(was_training)
    maps = accumulate_windows(scores, x.shape[-2:], window, stride, normalise, accumulate, minmax)[:, None]
    return maps[0] if single else maps


class TargetnessInferer(Inferer):
    """MONAI inferer of a patch classifier over whole images: ``output="map"`` gives the targetness maps
    ``(B, 1, H, W)`` (:func:`targetness_map`); ``"raw_map"`` the same before min-max normalisation (with coverage
    normalisation: the mean window probability per pixel, whose maximum scores the image); ``"max_logit"`` the
    image's score ``(B, 1)``, the highest window logit (an image holds a target if one window does: what validation
    ranks images by)."""

    def __init__(self, window: int = 48, stride: int = 8, batch_size: int = 1024, output: str = "map",
                 normalise: str = "coverage", accumulate: str = "target"):
        super().__init__()
        if output not in ("map", "raw_map", "max_logit"):
            raise ValueError(f"output must be 'map', 'raw_map' or 'max_logit', got {output!r}")
        self.window, self.stride, self.batch_size, self.output = int(window), int(stride), int(batch_size), output
        self.normalise, self.accumulate = normalise, accumulate

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        if self.output in ("map", "raw_map"):
            return targetness_map(network, x.float(), self.window, self.stride, self.batch_size, self.normalise,
                                  self.accumulate, minmax=self.output == "map")
        return window_scores(network, x.float(), self.window, self.stride, self.batch_size, logits=True).flatten(1).amax(1)[:, None]
