"""Resized copies of a datalist's images, made once for many runs: each image is read as training reads it
(:func:`~cutremain_monai.io.loader.load_xray`: modality LUT, window, MONOCHROME1 inversion for DICOM), shrunk so
its long side is ``max_side`` (area averaging), and written as a 16-bit PNG; its boxes are scaled to the new pixels.

For experiments that train many models on small inputs (``cutremain experiment compare`` at 128-224 px on a CPU):
decoding a 1,000-3,000 px radiograph costs more than a small epoch of it, and a cache of native-size arrays does
not fit in memory for every run. The PNG reloads to the same [0, 1] intensities (16-bit, divided by 65535), so the
copies change only the resolution the augmentation works at. Files are named by a hash of the item's key (no
path or name of the source leaks into the copy), and an existing copy is reused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cutremain_monai.io.loader import load_xray, save_png16

__all__ = ["resized_copies"]


def resized_copies(items: Sequence[dict], folder: str, max_side: int, key: str = "image_id") -> list[dict]:
    """``items`` with ``image`` pointing at the copies in ``folder`` and ``boxes`` scaled; ``key`` (else the image
    path) stays the item's name in outputs. Items that hold paths the copy cannot follow (``gsps``, ``lung_mask``)
    are refused: their boxes or masks would no longer line up."""
    if max_side < 8:
        raise ValueError(f"max_side must be at least 8, got {max_side}")
    folder = os.path.abspath(folder)  # the copies are named from datalists written anywhere
    os.makedirs(folder, exist_ok=True)
    out = []
    for it in items:
        for other in ("gsps", "lung_mask", "sr"):
            if it.get(other) is not None:
                raise ValueError(f"{it.get(key) or it['image']}: resized copies keep the image and its boxes only, "
                                 f"not '{other}' (import the boxes into the datalist first)")
        name = str(it.get(key) or it["image"])
        path = os.path.join(folder, hashlib.sha256(name.encode()).hexdigest()[:20] + ".png")
        size_path = path + ".size"
        if os.path.exists(path) and os.path.exists(size_path):
            with open(size_path) as f:
                h0, w0 = (int(v) for v in f.read().split())
            with Image.open(path) as im:
                w1, h1 = im.size
        else:
            img = load_xray(str(it["image"]))  # (1, H, W) in [0, 1]
            h0, w0 = int(img.shape[-2]), int(img.shape[-1])
            scale = min(1.0, max_side / max(h0, w0))
            h1, w1 = max(1, round(h0 * scale)), max(1, round(w0 * scale))
            small = F.interpolate(torch.as_tensor(np.asarray(img), dtype=torch.float32)[None], size=(h1, w1), mode="area")[0, 0]
            save_png16(path, small.numpy())
            with open(size_path, "w") as f:
                f.write(f"{h0} {w0}")
        sy, sx = h1 / h0, w1 / w0
        boxes = np.asarray(it.get("boxes", []), dtype=np.float64).reshape(-1, 4) * np.array([sx, sy, sx, sy])
        out.append({**it, "image": path, key: name, "boxes": boxes.round(3).tolist()})
    return out
