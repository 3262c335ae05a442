"""Synthetic chest-X-ray-like archives of any size, for the tests (tens of images) and the benchmarks (20,000).

``generate_scale_set(out_dir, n, size)`` writes ``n`` images of ``size x size`` pixels (8-bit PNG, as the NIH
ChestX-ray14 files are, or 12-bit DX DICOM) and a ``datalist.json`` with ``training`` / ``validation`` sections:
binary labels, and on a share of the positives one lesion box, plus a ``group`` per image (one pseudonymous patient
per two images) so the group-aware splitters have something to keep together.

What it adds over :mod:`cutremain_monai.data.phantoms`: speed at scale. The phantom tasks render every image from
scratch (a few hundred milliseconds at 1024 px); here ``templates`` thorax-like bases are rendered once and each
image is a template shifted, exposure-scaled and noised, with a bright blob in its box for positives, so 20,000
files at 1024 px are limited by the PNG encoder (about 15 ms each). The images are not meant to be classified
well: they have the size, bit depth, file format and box statistics of a real archive, which is what the input
pipeline's speed and memory depend on.

Deterministic from ``seed``: the same call writes the same bytes.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from cutremain_monai.io.dx_writer import make_uid, write_dx

__all__ = ["render_template", "scale_image", "generate_scale_set"]


def render_template(rng: np.random.Generator, size: int) -> np.ndarray:
    """A thorax-like image in [0, 1] (``(size, size)`` float32): body, two darker lungs, ribs, spine, mediastinum."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = 0.35 + 0.25 * np.exp(-((xx - 0.5) / 0.42) ** 2) * (yy > 0.05)
    for cx in (0.32 + 0.03 * rng.standard_normal(), 0.68 + 0.03 * rng.standard_normal()):
        lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        img = img - 0.22 * lung
        for k in range(8):  # ribs: bright arcs across each lung
            y0 = 0.25 + 0.065 * k + 0.01 * rng.standard_normal()
            arc = np.abs(yy - y0 - 0.08 * ((xx - cx) / 0.15) ** 2) < 0.011
            img = img + 0.08 * (arc & lung)
    img = img + 0.25 * (np.abs(xx - 0.5) < 0.035) + 0.1 * np.exp(-((xx - 0.47) / 0.08) ** 2 - ((yy - 0.62) / 0.12) ** 2)
    return np.clip(img, 0, 1).astype(np.float32)


def scale_image(template: np.ndarray, rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, list[float] | None]:
    """One image from ``template``: shifted, exposure-scaled, noised; a positive gets a bright blob and its box."""
    size = template.shape[0]
    dy, dx = (int(v) for v in rng.integers(-size // 20, size // 20 + 1, 2))
    img = np.roll(template, (dy, dx), axis=(0, 1)) * np.float32(rng.uniform(0.85, 1.1))
    img = img + rng.standard_normal((size // 8, size // 8)).astype(np.float32).repeat(8, 0).repeat(8, 1)[:size, :size] * 0.01
    box = None
    if positive:
        r = size * rng.uniform(0.03, 0.07)
        cx, cy = (float(v) for v in rng.uniform(0.25 * size, 0.75 * size, 2))
        yy, xx = np.ogrid[0:size, 0:size]
        img = img + 0.15 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (r * r)))
        box = [round(cx - 1.5 * r, 1), round(cy - 1.5 * r, 1), round(cx + 1.5 * r, 1), round(cy + 1.5 * r, 1)]
        box = [min(max(v, 0.0), float(size)) for v in box]
    return np.clip(img, 0, 1), box


def generate_scale_set(out_dir: str, n: int, size: int = 1024, fmt: str = "png", seed: int = 0, templates: int = 8,
                       positive_share: float = 0.5, boxed_share: float = 0.5, validation_share: float = 0.1,
                       start: int = 0) -> dict:
    """Write ``n`` images under ``out_dir/images/`` and ``out_dir/datalist.json``; returns the datalist.

    ``fmt``: ``png`` (8-bit grey) or ``dicom`` (12-bit DX, uncompressed). Images already on disk are kept, so an
    interrupted generation of a large set resumes (``start`` and the seed fix every image's content). Paths in the
    datalist are relative to ``out_dir``.
    """
    if fmt not in ("png", "dicom"):
        raise ValueError(f"fmt must be 'png' or 'dicom', got {fmt!r}")
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    base = [render_template(np.random.default_rng([seed, 10_000 + t]), size) for t in range(templates)]
    items = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        positive = bool(rng.random() < positive_share)
        img, box = scale_image(base[int(rng.integers(templates))], rng, positive)
        name = f"images/img_{i:06d}.{'png' if fmt == 'png' else 'dcm'}"
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            tmp = path + ".tmp"
            if fmt == "png":
                Image.fromarray(np.round(img * 255).astype(np.uint8)).save(tmp, format="PNG", compress_level=1)
            else:
                write_dx(tmp, np.round(img * 4095).astype(np.uint16), bits_stored=12, uid_seed=f"scale-{seed}-{i}",
                         study_uid=make_uid("scale-study", seed, i // 2), patient_id=f"SCALE{i // 2:06d}")
            os.replace(tmp, path)
        item = {"image": name, "label": int(positive), "group": f"p{i // 2:06d}"}
        if box is not None and rng.random() < boxed_share:
            item.update(boxes=[box], box_labels=["lesion"])
        items.append(item)
    n_val = int(round(len(items) * validation_share))
    datalist = {"training": items[n_val:], "validation": items[:n_val]}
    with open(os.path.join(out_dir, "datalist.json"), "w") as f:
        json.dump(datalist, f)
    return datalist


def main(argv=None) -> int:  # python -m cutremain_monai.data.scale_data OUT_DIR N [SIZE] [png|dicom]
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python -m cutremain_monai.data.scale_data OUT_DIR N [SIZE] [png|dicom]")
        return 2
    d = generate_scale_set(args[0], int(args[1]), int(args[2]) if len(args) > 2 else 1024, args[3] if len(args) > 3 else "png")
    print(json.dumps({section: len(v) for section, v in d.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
