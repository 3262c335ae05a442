"""COVID severity on a folder of chest X-rays (DICOM, PNG or JPEG): lung mask (from a mask folder when one is given
for the image, else from the lung-segmentation model), Brixia zones, the test-time checkpoint ensemble, and per
image the six zone probabilities, zone labels, the global score and a lesion-map overlay with the zone grid.

One unreadable file, or a lung mask without two lungs, is a row with its error in the CSV; the folder goes on.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence

import torch
from monai.transforms import Compose, HistogramNormalize, NormalizeIntensity, Resize

from cutremain_monai.constants import BRIXIA_ZONES
from cutremain_monai.engines.inference import _files
from cutremain_monai.io.loader import load_xray
from cutremain_monai.localization.severity_overlay import save_severity_overlay
from cutremain_monai.networks.ensemble import CheckpointEnsemble
from cutremain_monai.networks.lung_unet import segment_lungs
from cutremain_monai.transforms.lung_zones import LungZoneError, split_lung_zones
from cutremain_monai.transforms.severity_preprocess import GaussianBlur3x3, LungMask

__all__ = ["preprocess_image", "predict_severity_folder"]

logger = logging.getLogger(__name__)


def preprocess_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """The paper's preprocessing of a ``(1, H, W)`` [0, 1] image: resize, 3x3 blur, histogram equalisation,
    normalisation (the same chain as the bundle's transforms)."""
    chain = Compose([Resize((size, size), mode="area"), GaussianBlur3x3(), HistogramNormalize(num_bins=256, min=0, max=1),
                     NormalizeIntensity()])
    return torch.as_tensor(chain(image)).float()


def _mask_for(path: str, input_dir: str, mask_dir: str | None, suffix: str = "") -> str | None:
    if not mask_dir:
        return None
    stem = os.path.splitext(os.path.relpath(path, input_dir))[0] + suffix
    for ext in (".png", ".jpg", ".jpeg", ".dcm"):
        p = os.path.join(mask_dir, stem + ext)
        if os.path.exists(p):
            return p
    return None


def predict_severity_folder(network: torch.nn.Module, input_dir: str, output_dir: str, checkpoints: Sequence[str],
                            image_size: int = 256, seg_network: torch.nn.Module | None = None,
                            seg_checkpoint: str | None = None, seg_image_size: int = 256, mask_dir: str | None = None,
                            device=None, threshold: float = 0.5, overlays: bool = True, mask_suffix: str = "") -> str:
    """Score the folder; returns the CSV path (``severity.csv`` in ``output_dir``). The mask of ``a/b.dcm`` is
    ``mask_dir/a/b<mask_suffix>.png`` (or .jpg / .dcm); with a suffix, files named like masks are not scored."""
    device = device or torch.device("cpu")
    model = CheckpointEnsemble(network, checkpoints, what="severity model").to(device).eval()
    seg = None
    if seg_network is not None and seg_checkpoint and os.path.exists(seg_checkpoint):
        state = torch.load(seg_checkpoint, map_location="cpu", weights_only=True)
        seg_network.load_state_dict(state.get("model", state) if "model" in state else state)
        seg = seg_network.to(device).eval()
    os.makedirs(output_dir, exist_ok=True)
    rows = []
    for path in _files(input_dir):
        name = os.path.relpath(path, input_dir)
        if mask_suffix and os.path.splitext(path)[0].endswith(mask_suffix):
            continue
        row = {"file": name, "error": ""}
        try:
            img = load_xray(path).as_tensor()
            x = preprocess_image(img, image_size)
            mpath = _mask_for(path, input_dir, mask_dir, mask_suffix)
            if mpath:
                mask = Resize((image_size, image_size), mode="nearest")(LungMask()(load_xray(mpath).as_tensor()))
                row["mask_source"] = "file"
            elif seg is not None:
                mask = segment_lungs(seg, x, seg_image_size, (image_size, image_size))
                row["mask_source"] = "segmented"
            else:
                raise FileNotFoundError("no lung mask: give mask_dir or a trained lung-segmentation checkpoint")
            zones = torch.as_tensor(split_lung_zones(mask))[None]
        except (LungZoneError, OSError, ValueError) as e:  # one bad image never stops the folder
            row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            continue
        mask = torch.as_tensor(mask).float()
        xb, mb, zb = x[None].to(device), mask[None].to(device), zones[None].to(device)
        with torch.no_grad():
            probs = model(xb, mb, zb)
            probs = (probs[0] if isinstance(probs, tuple) else probs)[0].cpu()
            lesion = torch.stack([m.masked_map(xb, mb) for m in model.members]).mean(0)[0, 0].cpu()
        labels = (probs >= threshold).int()
        row.update({f"p_{z}": round(float(p), 6) for z, p in zip(BRIXIA_ZONES, probs)})
        row.update({f"zone_{z}": int(v) for z, v in zip(BRIXIA_ZONES, labels)})
        row.update(global_score=round(float(probs.sum()), 4), global_binary=int(labels.sum()))
        if overlays:
            out = os.path.join(output_dir, "overlays", name.replace(os.sep, "__") + ".png")
            save_severity_overlay(out, x[0], lesion, zones[0], probs, None, title=f"global {float(probs.sum()):.1f}")
            row["overlay"] = os.path.relpath(out, output_dir)
        rows.append(row)
    fields = ["file", *[f"p_{z}" for z in BRIXIA_ZONES], *[f"zone_{z}" for z in BRIXIA_ZONES], "global_score",
              "global_binary", "mask_source", "overlay", "error"]
    out_csv = os.path.join(output_dir, "severity.csv")
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    logger.info("wrote %d rows to %s (%d errors)", len(rows), out_csv, sum(1 for r in rows if r["error"]))
    return out_csv
