"""Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhyay et al. 2018) at any named layer, batched.

Conventions (``target``, output size, normalisation, eval mode, hooks) as in :mod:`cutremain_monai.localization.cam`.

What ``monai.visualize`` (1.6) gives and what this module adds:

* MONAI's ``GradCAM`` / ``GradCAMpp`` compute the same Grad-CAM map and upsample with ``default_upsampler`` (bilinear
  for 2D, ``align_corners=False``), which is reused here. Their equivalence is tested
  (``tests/localization/test_cam.py``).
* MONAI registers its hooks in the constructor and never removes them (each ``GradCAM(...)`` adds a forward and a
  full backward hook for good), sets the target module's ``inplace`` to False, runs ``model.zero_grad()`` and a full
  ``backward()`` (every parameter gradient is computed and the caller's ``.grad`` wiped). Here one forward hook lives
  for the call only, and the gradient is taken with ``torch.autograd.grad`` with respect to the layer's output:
  nothing before the layer is back-propagated and no ``.grad`` changes.
* MONAI takes one class per call (``class_idx=None`` scores ``logits[:, argmax]``, a ``(B, B)`` block, so a batch
  mixes the images' classes); here ``target=None`` gives every class (one backward per class, the forward shared),
  an int one class for all, and one class per image is a single backward.
* MONAI's default post-processing maps max -> 0 and min -> 1 (``default_normalizer`` flips the map) on the CPU via
  numpy; here ``normalise=True`` min-max scales each map to [0, 1] in torch and ``normalise=False`` keeps the raw
  maps.
* ``GradCAMpp`` (MONAI) multiplies the gradient by ``exp(score)`` with a ``(B,)`` score that broadcasts against the
  last spatial axis: batches of more than one image fail, or silently mix images when the width equals the batch.
  Its denominator ``sum_ab A_ab g_ab^3`` also differs from the paper's eq. 19 (``g_ij^3 sum_ab A_ab``); the two agree
  only where the gradient is spatially constant (the layer just before global average pooling).
* The layer is chosen by name with a clear error, and :func:`cutremain_monai.localization.cam.cam_grid` tells the
  map's resolution: the default ``layer3`` gives 14x14 cells on the project's ResNets at 224 px (28x28 at 448 px),
  where ``layer4`` gives 7x7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cutremain_monai.localization.cam import capture_output, check_output, evaluating, find_layer, finish, plain, selections

__all__ = ["grad_cam", "grad_cam_pp", "differentiable_grad_cam", "DEFAULT_LAYER"]

DEFAULT_LAYER = "layer3"


def _grad_cam_map(acti: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``ReLU(sum_k mean_u(dy/dA_k) A_k)``, one map per image: ``(B, 1, *grid)``."""
    weights = grad.flatten(2).mean(-1)
    return F.relu(torch.einsum("bc...,bc->b...", acti, weights)).unsqueeze(1)


def _grad_cam_pp_map(acti: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (eq. 19 with the exponential score, as in the paper): ``alpha_ij = g_ij^2 / (2 g_ij^2 + g_ij^3
    sum_ab A_ab)``, ``w_k = sum_ij alpha_ij ReLU(g_ij)``, map ``ReLU(sum_k w_k A_k)``.

    ``alpha_ij ReLU(g_ij)`` is computed as ``g / (2 + g sum A)`` where ``g > 0`` (0 elsewhere): the same value
    without powers of tiny gradients (MONAI's ``+ 1e-7`` in the denominator outweighs ``g^2`` below ~3e-4 and
    shrinks those weights). The paper's factor ``exp(score)`` is left out: it is one positive number per image
    (normalised maps do not change) and overflows float32 for logits above ~88; raw maps are MONAI's divided by it.
    """
    spatial = [1] * (acti.ndim - 2)
    total = acti.flatten(2).sum(-1).reshape(*acti.shape[:2], *spatial)
    denom = 2 + grad * total
    denom = torch.where(denom != 0, denom, torch.ones_like(denom))
    contrib = torch.where(grad > 0, grad / denom, torch.zeros_like(grad))
    weights = contrib.flatten(2).sum(-1)
    return F.relu(torch.einsum("bc...,bc->b...", acti, weights)).unsqueeze(1)


def grad_cam(model: torch.nn.Module, x: torch.Tensor, target=None, layer: str = DEFAULT_LAYER, plus_plus: bool = False,
             normalise: bool = True) -> torch.Tensor:
    """Grad-CAM (or Grad-CAM++ with ``plus_plus=True``) maps at ``layer`` for a batch ``x`` ``(B, C, H, W)``.

    Args:
        model: a classifier returning logits ``(B, K)`` (``K = 1`` for a binary single-logit network).
        x: the batch (a MONAI MetaTensor is fine; maps are plain tensors).
        target: ``None`` -> every class, ``(B, K, H, W)``; an int -> that class for every image, ``(B, 1, H, W)``;
            one int per image (sequence or 1D tensor) -> ``(B, 1, H, W)``.
        layer: module name as in ``model.named_modules()``; the default ``"layer3"`` gives 14x14 cells on the
            project's ResNets at 224 px (see ``cam_grid``).
        plus_plus: Grad-CAM++ weights instead of the mean gradient.
        normalise: min-max scale each map to [0, 1] (a constant map -> 0); ``False`` returns the raw ReLU maps.

    One forward (eval mode, restored afterwards) and one ``torch.autograd.grad`` per output class from the logits to
    the layer (the images of the batch in the same call). Maps are upsampled bilinearly to the input size, detached.
    """
    x = plain(x)
    module = find_layer(model, layer)
    method = _grad_cam_pp_map if plus_plus else _grad_cam_map
    with evaluating(model), torch.enable_grad(), capture_output(module, grad=True) as store:
        logits = model(x)
        if store["calls"] != 1:
            raise ValueError(f"layer {layer!r} ran {store['calls']} times in one forward; choose a layer that runs once")
        acti = store["out"]
        flat = check_output(logits, x.shape[0])
        sels = selections(target, x.shape[0], flat.shape[1], flat)
        maps = []
        for i, sel in enumerate(sels):
            (grad,) = torch.autograd.grad(logits, acti, grad_outputs=sel.reshape(logits.shape), retain_graph=i < len(sels) - 1,
                                          allow_unused=True)
            if grad is None:
                raise ValueError(f"the logits do not depend on layer {layer!r}")
            maps.append(method(acti.detach(), grad))
        del logits, acti, store["out"]
    return finish(torch.cat(maps, 1), x.shape[2:], normalise)


def grad_cam_pp(model: torch.nn.Module, x: torch.Tensor, target=None, layer: str = DEFAULT_LAYER, normalise: bool = True) -> torch.Tensor:
    """Grad-CAM++: :func:`grad_cam` with ``plus_plus=True``."""
    return grad_cam(model, x, target, layer=layer, plus_plus=True, normalise=normalise)


def differentiable_grad_cam(model: torch.nn.Module, x: torch.Tensor, target, layer: str = DEFAULT_LAYER,
                            normalise: bool = True, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM for training through it (GAIN's attention mining and extra supervision): ``(maps, logits)`` of
    ONE forward in the model's current mode (train mode stays train mode). ``target`` may also be a callable
    ``logits (B, K) -> one class per image``, for a class chosen from this forward.

    Unlike :func:`grad_cam` (and the public GAIN implementations, which take the channel weights from a backward
    hook, so they are constants), the gradient of the selected logits with respect to the layer is taken with
    ``create_graph=True``: the maps are differentiable with respect to the weights through the activations AND the
    channel weights ``w_k = mean_u dy/dA_k``. Maps ``(B, 1, H, W)`` (one class per image: ``target`` an int or one
    per image) are ReLU(sum_k w_k A_k), bilinearly upsampled to the input; ``normalise`` divides each by its
    maximum (+ ``eps``; a differentiable scale to [0, 1], the min of a ReLU map being 0 almost always). The
    ``logits`` are the forward's, for the classification loss of the same step.
    """
    x = plain(x)
    module = find_layer(model, layer)
    with torch.enable_grad(), capture_output(module, grad=False) as store:
        logits = model(x)
    if store["calls"] != 1:
        raise ValueError(f"layer {layer!r} ran {store['calls']} times in one forward; choose a layer that runs once")
    acti = store["out"]
    flat = check_output(logits, x.shape[0])
    if callable(target):  # chosen from this forward's logits (e.g. GAIN's multi-label class of highest logit)
        target = target(flat.detach())
    (sel,) = selections(target, x.shape[0], flat.shape[1], flat)
    score = (flat * sel).sum()
    (grad,) = torch.autograd.grad(score, acti, create_graph=True)
    with torch.autocast(device_type=x.device.type, enabled=False):  # float32 maps: eps = 1e-8 is 0 in float16
        maps = _grad_cam_map(acti.float(), grad.float()) if acti.dtype in (torch.float16, torch.bfloat16) else _grad_cam_map(acti, grad)
        maps = F.interpolate(maps, size=tuple(x.shape[2:]), mode="bilinear" if x.ndim == 4 else "trilinear", align_corners=False)
        if normalise:
            peak = maps.flatten(2).amax(-1).reshape(*maps.shape[:2], *([1] * (maps.ndim - 2)))
            maps = maps / (peak + eps)
    return maps, logits
