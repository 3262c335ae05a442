"""Class activation maps (CAM, Zhou et al. 2016) for networks ending in global average pooling + linear, and PNG
overlays with the boxes drawn.

Grad-CAM and Grad-CAM++ (any named layer) live in :mod:`cutremain_monai.localization.grad_cam`; both modules share
the conventions below (the helpers here are used by both):

* ``target``: ``None`` = every class (maps ``(B, K, *spatial)``), an ``int`` = that class for every image, or one
  ``int`` per image (list / 1D tensor; maps ``(B, 1, *spatial)``). A binary single-logit network has ``K = 1``.
* Maps come back at the input's spatial size (bilinear, ``align_corners=False``: MONAI's ``default_upsampler``),
  detached, float, on the input's device; ``normalise=True`` min-max scales each map to [0, 1] (a constant map
  becomes all zeros), ``normalise=False`` returns the raw maps (localisation metrics, guidance losses).
* The model runs in eval mode (so a batch gives the same maps as its images one by one) and every module's
  train / eval flag is restored afterwards; hooks are removed even when the call fails; parameters' ``.grad`` is
  never touched.

The share of a map's energy inside the boxes, the localisation number the Cut&Remain paper argues about, is
:func:`cutremain_monai.metrics.localization.energy_in_box` (and ``energy_in_mask`` for a mask already drawn).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np
import torch
from monai.visualize.visualizer import default_upsampler

from cutremain_monai.localization.normalise import as_array, normalise_map

__all__ = ["cam", "cam_grid", "overlay_image", "save_overlay"]


# ---------------------------------------------------------------------------------------------- shared helpers
def find_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule called ``name`` (``model.named_modules()`` spelling, e.g. ``"layer3"``, ``"layer4.1.conv2"``);
    for a DataParallel / DDP wrapper ``module.`` is prepended when needed."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"layer must be a non-empty module name, got {name!r}")
    modules = dict(model.named_modules())
    if name not in modules and hasattr(model, "module") and f"module.{name}" in modules:
        name = f"module.{name}"
    if name not in modules:
        children = [n for n, _ in (model.module if hasattr(model, "module") else model).named_children()]
        raise ValueError(f"no layer named {name!r} in {type(model).__name__}; top-level layers: {children}")
    return modules[name]


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """Eval mode inside; afterwards every module's own ``training`` flag as it was (mixed modes survive)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in modes:
            m.training = flag


class _Stop(Exception):
    pass


@contextlib.contextmanager
def capture_output(module: torch.nn.Module, grad: bool = False, stop: bool = False):
    """Record ``module``'s output in ``store["out"]`` during the forward; the hook is removed on exit.

    ``grad=True``: the recorded tensor is made differentiable (a leaf when the layers before it are frozen) and a
    clone is passed on, so in-place operations after the layer (``ReLU(inplace=True)``, ``+=``) cannot change the
    recorded activations or break ``torch.autograd.grad`` with respect to them. ``stop=True`` ends the forward
    right after the layer (raises ``_Stop``, for shape queries).
    """
    store: dict = {"calls": 0}

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {type(_module).__name__} returns {type(output).__name__}, not a tensor")
        store["calls"] += 1
        if stop:
            store["out"] = output
            raise _Stop
        if not grad:
            store["out"] = output
            return None
        out = output if output.requires_grad else output.detach().requires_grad_(True)
        store["out"] = out
        return out.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def plain(x: torch.Tensor) -> torch.Tensor:
    """A plain ``torch.Tensor`` (MONAI MetaTensor -> tensor) so the maps carry no image metadata."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def check_output(logits: torch.Tensor, batch: int) -> torch.Tensor:
    """Logits as ``(B, K)`` (``(B,)`` outputs are one logit per image)."""
    if logits.shape[0] != batch:
        raise ValueError(f"the model returned {tuple(logits.shape)} for a batch of {batch}")
    return logits.reshape(batch, -1)


def selections(target, batch: int, classes: int, like: torch.Tensor) -> list[torch.Tensor]:
    """One ``(B, K)`` 0/1 selector per output map channel: ``None`` -> K selectors (one per class), an int -> one
    selector with that column, one int per image -> one selector with one entry per row."""
    if target is None:
        return [torch.nn.functional.one_hot(torch.full((batch,), k, device=like.device), classes).to(like.dtype)
                for k in range(classes)]
    if isinstance(target, torch.Tensor) and target.ndim == 0:
        target = int(target)
    if isinstance(target, (int, np.integer)):
        idx = torch.full((batch,), int(target), dtype=torch.long)
    else:
        idx = torch.as_tensor(np.asarray(target if not isinstance(target, torch.Tensor) else target.cpu()), dtype=torch.long).reshape(-1)
        if idx.numel() != batch:
            raise ValueError(f"target has {idx.numel()} entries for a batch of {batch}; give one class per image, an int or None")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= classes):
        raise ValueError(f"target {idx.tolist()} out of range for a model with {classes} output(s)")
    return [torch.nn.functional.one_hot(idx.to(like.device), classes).to(like.dtype)]


def finish(maps: torch.Tensor, spatial_size: Sequence[int], normalise: bool) -> torch.Tensor:
    """``(B, M, *grid)`` -> ``(B, M, *spatial_size)`` (bilinear / trilinear, ``align_corners=False``), then min-max
    per map when ``normalise`` (constant maps -> 0). Linear interpolation stays inside each map's [min, max], so
    normalising after upsampling gives exactly [0, 1]."""
    maps = maps.detach().float()
    if tuple(maps.shape[2:]) != tuple(spatial_size):
        maps = default_upsampler(tuple(spatial_size))(maps)
    if normalise:
        flat = maps.flatten(2)
        lo = flat.min(-1, keepdim=True).values
        span = flat.max(-1, keepdim=True).values - lo
        flat = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(flat))
        maps = flat.reshape(maps.shape)
    return maps


def _in_channels(model: torch.nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            return int(m.in_channels)
    raise ValueError("cannot infer the input channels (no convolution); pass in_channels")


def cam_grid(model: torch.nn.Module, layer: str, size, in_channels: int | None = None) -> tuple[int, ...]:
    """Spatial grid of ``layer``'s output for an input of ``size`` (int or per-dimension sequence): the map's cells
    before upsampling. The forward runs on zeros, in eval mode, and stops at the layer.

    The project's ResNets (stride-2 stem, max pooling) have strides 4 / 4 / 8 / 16 / 32 at
    conv1+maxpool / layer1 / layer2 / layer3 / layer4: ``layer3`` gives 14x14 at the CPU configs' 224 px and 28x28
    at the training configs' 448 px; ``layer4`` only 7x7 / 14x14.
    """
    dims = 2 if isinstance(size, (int, np.integer)) else len(size)
    shape = (int(size),) * dims if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    param = next(model.parameters(), None)
    x = torch.zeros((1, in_channels or _in_channels(model), *shape), device=param.device if param is not None else "cpu")
    with evaluating(model), torch.no_grad(), capture_output(find_layer(model, layer), stop=True) as store:
        try:
            model(x)
        except _Stop:
            pass
    if "out" not in store:
        raise ValueError(f"layer {layer!r} is not used by the model's forward")
    return tuple(int(s) for s in store["out"].shape[2:])


# ---------------------------------------------------------------------------------------------------------- CAM
def cam(model: torch.nn.Module, x: torch.Tensor, target=None, normalise: bool = True, pool: str = "avgpool",
        fc: str = "fc") -> torch.Tensor:
    """Class activation maps (Zhou et al., CVPR 2016) for a network ending in global average pooling + linear.

    ``M_k(u) = sum_c W[k, c] * F_c(u)`` with ``F`` the features entering the pooling layer ``pool`` and ``W`` the
    weight of the linear layer ``fc`` (MONAI / torchvision ResNet: ``avgpool`` / ``fc``, features = ``layer4``).
    As in the paper there is no ReLU and no bias: the raw map (``normalise=False``) is signed and its mean over
    the feature grid equals ``logit_k - bias_k``; ``normalise=True`` min-max scales each upsampled map to [0, 1]
    (the bias, a constant, would not change it). One forward without gradients; ``target`` as in the module
    docstring; maps ``(B, K or 1, H, W)`` at the input size (bilinear).

    Raises ``ValueError`` when the features do not reach ``fc`` through a global average (the only case where CAM is
    exact): the input of ``fc`` is checked against the spatial mean of the pooled features on this batch.

    Against ``monai.visualize.CAM``: same map up to the bias (MONAI evaluates ``fc`` at every grid cell, bias
    included, one call per cell); ours adds several classes in one call, one class per image or an int for all,
    raw or normalised maps (MONAI's default normaliser maps max -> 0 and min -> 1), the GAP + linear check, and
    leaves no hooks on the model.
    """
    x = plain(x)
    pool_m, fc_m = find_layer(model, pool), find_layer(model, fc)
    if not isinstance(fc_m, torch.nn.Linear):
        raise ValueError(f"CAM needs a linear classifier; {fc!r} is {type(fc_m).__name__}")
    seen: dict = {}

    def keep_input(key):
        def hook(_module, inputs):
            seen[key] = inputs[0]
        return hook

    handles = [pool_m.register_forward_pre_hook(keep_input("features")), fc_m.register_forward_pre_hook(keep_input("pooled"))]
    try:
        with evaluating(model), torch.no_grad():
            logits = check_output(model(x), x.shape[0])
    finally:
        for h in handles:
            h.remove()
    if "features" not in seen or "pooled" not in seen:
        raise ValueError(f"{pool!r} or {fc!r} is not used by the model's forward")
    feats, pooled = seen["features"], seen["pooled"]
    mean = feats.flatten(2).mean(-1)
    if pooled.shape != mean.shape or not torch.allclose(pooled, mean, rtol=1e-4, atol=1e-5 * (1 + float(mean.abs().max()))):
        raise ValueError(f"CAM needs global average pooling followed directly by the linear layer; the input of {fc!r} "
                         f"({tuple(pooled.shape)}) is not the spatial mean of the features entering {pool!r} ({tuple(feats.shape)})")
    weight = fc_m.weight.detach().to(feats.dtype)  # (K, C)
    maps = torch.einsum("bc...,kc->bk...", feats, weight)  # (B, K, *grid)
    sel = selections(target, x.shape[0], logits.shape[1], maps)
    if target is not None:
        maps = (maps * sel[0].reshape(*sel[0].shape, *[1] * (maps.ndim - 2))).sum(1, keepdim=True)
    return finish(maps, x.shape[2:], normalise)


# ------------------------------------------------------------------------------------- box agreement, overlays
def overlay_image(image, cam, boxes: Sequence[Sequence[float]] = (), title: str = ""):
    """Grey image + jet-coloured CAM (alpha 0.4) + green ground-truth boxes, as a PIL RGB image (matplotlib's
    colormap)."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    grey = normalise_map(as_array(image, np.float32).squeeze()).astype(np.float32)
    heat = as_array(cam, np.float32).squeeze()
    rgb = np.stack([grey] * 3, axis=-1)
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    blend = (0.6 * rgb + 0.4 * colour) * 255
    pil = Image.fromarray(blend.astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 255, 0))
    if title:
        draw.text((2, 2), title, fill=(255, 255, 0))
    return pil


def save_overlay(path: str, image, cam, boxes: Sequence[Sequence[float]] = (), title: str = "") -> str:
    """:func:`overlay_image` saved as PNG at ``path`` (folders made)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    overlay_image(image, cam, boxes, title).save(path)
    return path
