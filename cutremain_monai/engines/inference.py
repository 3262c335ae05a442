"""Folder inference: every DICOM / PNG / JPEG in a folder -> a CSV of probabilities and Grad-CAM overlay PNGs.

With ``split_halves`` (clavicle, pelvis) each half is scored and the image-level probability is the maximum over
the halves (a fracture on either side makes the image positive). Files that cannot be read are listed in the CSV
with their error and do not stop the run.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence

import torch

from cutremain_monai.io.loader import load_xray
from cutremain_monai.localization.cam import grad_cam, save_overlay

__all__ = ["predict_folder"]

logger = logging.getLogger(__name__)

_EXTS = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", "")


def _files(input_dir: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(input_dir):
        dirs.sort()
        for f in sorted(files):
            if os.path.splitext(f)[1].lower() in _EXTS and not f.endswith("_gsps.dcm"):
                out.append(os.path.join(d, f))
    return out


def predict_folder(network: torch.nn.Module, input_dir: str, output_dir: str, image_size: Sequence[int] = (224, 224),
                   split_halves: bool = True, checkpoint: str | None = None, device=None, threshold: float = 0.5,
                   threshold_file: str | None = None, cam: bool = True, target_layer: str = "layer4") -> str:
    """Score the folder; returns the CSV path (``predictions.csv`` in ``output_dir``)."""
    import json

    from monai.transforms import Resize

    device = device or torch.device("cpu")
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        network.load_state_dict(state.get("model", state) if isinstance(state, dict) and "model" in state else state)
    if threshold_file and os.path.exists(threshold_file):
        with open(threshold_file) as f:
            threshold = float(json.load(f)["threshold"])
    network = network.to(device).eval()
    resize = Resize(spatial_size=tuple(image_size), mode="area")
    os.makedirs(output_dir, exist_ok=True)
    rows = []
    for path in _files(input_dir):
        name = os.path.relpath(path, input_dir)
        try:
            img = load_xray(path).as_tensor()
        except Exception as e:  # one bad file never stops the folder; it is reported in the CSV
            rows.append({"file": name, "probability": "", "prediction": "", "left": "", "right": "", "error": str(e)})
            continue
        w = img.shape[-1]
        parts = [img[..., : w // 2], img[..., w // 2 :]] if split_halves else [img]
        x = torch.stack([resize(p) for p in parts]).float().to(device)
        with torch.no_grad():
            probs = torch.sigmoid(network(x)).reshape(-1).cpu().tolist()
        p = max(probs)
        row = {"file": name, "probability": round(p, 6), "prediction": int(p >= threshold),
               "left": round(probs[0], 6) if split_halves else "", "right": round(probs[1], 6) if split_halves else "", "error": ""}
        rows.append(row)
        if cam:
            maps = grad_cam(network, x, target_layer)
            for i, m in enumerate(maps):
                side = ("left", "right")[i] if split_halves else "image"
                stem = name.replace(os.sep, "__")
                save_overlay(os.path.join(output_dir, "cam", f"{stem}_{side}.png"), x[i, 0].cpu(), m[0].cpu(), title=f"p={probs[i]:.2f}")
    out = os.path.join(output_dir, "predictions.csv")
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "probability", "prediction", "left", "right", "error"])
        w.writeheader()
        w.writerows(rows)
    logger.info("wrote %d predictions to %s", len(rows), out)
    return out
