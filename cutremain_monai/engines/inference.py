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


def _probabilities(logits: torch.Tensor, label_mode: str) -> torch.Tensor:
    return torch.softmax(logits, 1) if label_mode == "multiclass" else torch.sigmoid(logits)


def predict_folder(network: torch.nn.Module, input_dir: str, output_dir: str, image_size: Sequence[int] = (224, 224),
                   split_halves: bool = True, checkpoint: str | None = None, device=None, threshold: float = 0.5,
                   threshold_file: str | None = None, cam: bool = True, target_layer: str = "layer4",
                   label_mode: str = "binary", class_names: Sequence[str] | None = None) -> str:
    """Score the folder; returns the CSV path (``predictions.csv`` in ``output_dir``).

    Binary: ``probability``, ``prediction`` (0/1 at the validation threshold) and the per-half probabilities.
    Multi-class (first class = normal): ``p_<class>`` per class from the half with the highest abnormal
    probability ``1 - p_normal``, ``prediction`` its arg-max class, ``left`` / ``right`` the per-half classes.
    Multi-label: ``p_<class>`` per class (max over halves), ``prediction`` the classes at or above their validation
    thresholds joined by ``|``.
    """
    import json

    from monai.transforms import Resize

    if label_mode not in ("binary", "multiclass", "multilabel"):
        raise ValueError(f"label_mode must be binary, multiclass or multilabel, got {label_mode!r}")
    device = device or torch.device("cpu")
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        network.load_state_dict(state.get("model", state) if isinstance(state, dict) and "model" in state else state)
    thresholds = None
    if threshold_file and os.path.exists(threshold_file):
        with open(threshold_file) as f:
            saved = json.load(f)
        threshold = float(saved.get("threshold", threshold))
        thresholds = saved.get("thresholds")
    network = network.to(device).eval()
    resize = Resize(spatial_size=tuple(image_size), mode="area")
    os.makedirs(output_dir, exist_ok=True)
    names = list(class_names or [])
    prob_cols = [] if label_mode == "binary" else [f"p_{n}" for n in names]
    fields = ["file", "probability", "prediction", "left", "right", *prob_cols, "error"]
    rows = []
    for path in _files(input_dir):
        name = os.path.relpath(path, input_dir)
        try:
            img = load_xray(path).as_tensor()
        except Exception as e:  # one bad file never stops the folder; it is reported in the CSV
            rows.append({"file": name, "error": str(e)})
            continue
        w = img.shape[-1]
        parts = [img[..., : w // 2], img[..., w // 2 :]] if split_halves else [img]
        x = torch.stack([resize(p) for p in parts]).float().to(device)
        with torch.no_grad():
            probs = _probabilities(network(x), label_mode).cpu()
        row = {"file": name, "error": ""}
        if label_mode == "binary":
            ph = probs.reshape(-1).tolist()
            p = max(ph)
            row.update(probability=round(p, 6), prediction=int(p >= threshold))
            if split_halves:
                row.update(left=round(ph[0], 6), right=round(ph[1], 6))
            cam_classes = [None] * len(ph)
            titles = [f"p={v:.2f}" for v in ph]
        elif label_mode == "multiclass":
            k = int((1 - probs[:, 0]).argmax())
            pred = probs.argmax(1).tolist()
            row.update({c: round(float(v), 6) for c, v in zip(prob_cols, probs[k])})
            row.update(probability=round(float(1 - probs[k, 0]), 6), prediction=names[pred[k]] if names else pred[k])
            if split_halves:
                row.update(left=names[pred[0]] if names else pred[0], right=names[pred[1]] if names else pred[1])
            cam_classes = pred
            titles = [f"{names[c] if names else c} p={float(probs[i, c]):.2f}" for i, c in enumerate(pred)]
        else:
            pmax = probs.amax(0)
            t = torch.as_tensor(thresholds if thresholds is not None else [threshold] * probs.shape[1], dtype=pmax.dtype)
            row.update({c: round(float(v), 6) for c, v in zip(prob_cols, pmax)})
            row.update(probability=round(float(pmax.max()), 6),
                       prediction="|".join(n for n, v, tt in zip(names, pmax.tolist(), t.tolist()) if v >= tt))
            cam_classes = probs.argmax(1).tolist()
            titles = [f"{names[c] if names else c} p={float(probs[i, c]):.2f}" for i, c in enumerate(cam_classes)]
        rows.append(row)
        if cam:
            for i in range(len(parts)):
                m = grad_cam(network, x[i : i + 1], target_layer, class_idx=cam_classes[i])
                side = ("left", "right")[i] if split_halves else "image"
                stem = name.replace(os.sep, "__")
                save_overlay(os.path.join(output_dir, "cam", f"{stem}_{side}.png"), x[i, 0].cpu(), m[0, 0].cpu(), title=titles[i])
    out = os.path.join(output_dir, "predictions.csv")
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    logger.info("wrote %d predictions to %s", len(rows), out)
    return out
