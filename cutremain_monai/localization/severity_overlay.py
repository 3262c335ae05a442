"""Lesion-map overlays for the COVID severity model: the X-ray, the lesion probability map (jet, inside the lungs)
and the Brixia zone grid (zone borders in white, each zone's letter with its pooled probability and, when known,
the reference label), as PNG."""

from __future__ import annotations

import os

import numpy as np
import torch

from cutremain_monai.constants import BRIXIA_ZONES
from cutremain_monai.localization.normalise import normalise_map

__all__ = ["zone_borders", "save_severity_overlay"]


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x).squeeze()


def zone_borders(zones) -> np.ndarray:
    """Boolean ``(H, W)``: pixels whose zone differs from the pixel to the right or below (the zone grid)."""
    z = _np(zones).astype(np.int64)
    edge = np.zeros(z.shape, dtype=bool)
    edge[:, :-1] |= z[:, :-1] != z[:, 1:]
    edge[:-1, :] |= z[:-1, :] != z[1:, :]
    return edge & ((z > 0) | np.roll(z > 0, -1, 0) | np.roll(z > 0, -1, 1))


def save_severity_overlay(path: str, image, lesion_map, zones, zone_probs=None, zone_labels=None, title: str = "") -> str:
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    img = _np(image).astype(np.float32)
    heat = np.clip(_np(lesion_map).astype(np.float32), 0, 1)
    z = _np(zones).astype(np.int64)
    grey = normalise_map(img).astype(np.float32)
    rgb = np.stack([grey] * 3, axis=-1)
    colour = colormaps["jet"](heat)[..., :3]
    alpha = np.where(z > 0, 0.45, 0.0)[..., None]
    out = (1 - alpha) * rgb + alpha * colour
    out[zone_borders(z)] = 1.0
    pil = Image.fromarray((out * 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for k, name in enumerate(BRIXIA_ZONES, start=1):
        ys, xs = np.nonzero(z == k)
        if len(ys) == 0:
            continue
        text = name
        if zone_probs is not None:
            text += f" {float(_np(zone_probs).reshape(-1)[k - 1]):.2f}"
        if zone_labels is not None:
            text += f"/{int(_np(zone_labels).reshape(-1)[k - 1])}"
        draw.text((int(xs.mean()) - 10, int(ys.mean()) - 5), text, fill=(255, 255, 255))
    if title:
        draw.text((2, 2), title, fill=(255, 255, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pil.save(path)
    return path
