"""Grad-CAM maps (``monai.visualize.GradCAM``), the share of CAM energy inside the ground-truth boxes, and PNG
overlays with the boxes drawn.

MONAI computes the map; this module adds the localisation number the Cut&Remain paper argues about ("does the model
look at the lesion"): ``energy_in_box = sum(cam * M) / sum(cam)`` with ``M`` the union of the boxes, 1.0 when all
the evidence lies in the annotated region and about ``box_area / image_area`` for a map that ignores it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["grad_cam", "energy_in_box", "save_overlay"]


def grad_cam(network: torch.nn.Module, images: torch.Tensor, target_layer: str = "layer4", class_idx: int | None = None) -> torch.Tensor:
    """Grad-CAM ``(B, 1, H, W)`` in [0, 1] (upsampled to the input) for ``class_idx`` (binary: the single logit)."""
    from monai.visualize import GradCAM

    was_training = network.training
    network.eval()
    cam = GradCAM(nn_module=network, target_layers=target_layer)
    with torch.enable_grad():
        maps = cam(x=images, class_idx=class_idx)
    network.train(was_training)
    return maps.detach()


def energy_in_box(cam, box_mask) -> float:
    """Share of the map's total energy inside ``box_mask`` (same spatial shape); NaN for an all-zero map."""
    cam = np.asarray(cam.detach().cpu() if isinstance(cam, torch.Tensor) else cam, dtype=np.float64)
    mask = np.asarray(box_mask.detach().cpu() if isinstance(box_mask, torch.Tensor) else box_mask) > 0
    if cam.shape != mask.shape:
        raise ValueError(f"cam shape {cam.shape} and box mask shape {mask.shape} differ")
    total = cam.sum()
    return float(cam[mask].sum() / total) if total > 0 else float("nan")


def save_overlay(path: str, image, cam, boxes: Sequence[Sequence[float]] = (), title: str = "") -> str:
    """Grey image + jet-coloured CAM (alpha 0.4) + green ground-truth boxes, as PNG (matplotlib's colormap)."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    img = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32).squeeze()
    heat = np.asarray(cam.detach().cpu() if isinstance(cam, torch.Tensor) else cam, dtype=np.float32).squeeze()
    lo, hi = float(img.min()), float(img.max())
    grey = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    rgb = np.stack([grey] * 3, axis=-1)
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    blend = (0.6 * rgb + 0.4 * colour) * 255
    pil = Image.fromarray(blend.astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 255, 0))
    if title:
        draw.text((2, 2), title, fill=(255, 255, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pil.save(path)
    return path
