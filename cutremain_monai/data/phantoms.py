"""Synthetic X-ray-like phantoms, written as DX DICOM with boxes in a datalist and in GSPS objects.

Deterministic from a seed. Four tasks mirror the product's bundles:

* ``clavicle`` (binary): two clavicle bands over ribs; a fracture is a small gap with a step inside its box. Every
  image, normal or not, also carries look-alike discontinuities on the ribs (the Cut&Remain paper's Figure 1:
  what a classifier can latch onto instead of the lesion). Normal images carry a box on a clavicle segment, as the
  paper annotates the relevant area of normal images.
* ``pelvis`` (3-class): normal / A-type trochanteric / B-type neck fracture of one femur, a line through the bone.
* ``chest`` (multi-label, 14 ChestX-ray14 findings, 4 rendered with boxes: Cardiomegaly, Effusion, Mass, Nodule).
* ``covid`` (chest with a lung mask PNG and six Brixia zone scores 0-3 from patchy opacities per zone).

The rendered image is an attenuation-like map in [0, 1] (bright = dense) that is quantised to ``bits_stored`` and
stored as MONOCHROME2, or inverted and stored as MONOCHROME1, so the reader's inversion is exercised.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from cutremain_monai.constants import BRIXIA_ZONES, CXR14_LABELS, RELEVANT_AREA
from cutremain_monai.io.dx_writer import make_uid, write_dx
from cutremain_monai.io.gsps import write_box_gsps
from cutremain_monai.data.lung_zones import split_lung_zones

__all__ = ["Phantom", "render_clavicle", "render_pelvis", "render_chest", "render_covid", "generate_samples",
           "burn_marker", "generate_shortcut_samples", "render_target_scene", "generate_background_samples",
           "generate_export_tree", "render_subtle", "generate_subtle_samples"]

CLAVICLE_BOX_LABELS = ("fracture", "normal_region")
PELVIS_CLASSES = ("normal", "trochanteric", "neck")
CHEST_BOXED = ("Cardiomegaly", "Effusion", "Mass", "Nodule")


@dataclass
class Phantom:
    image: np.ndarray  # (H, W) float in [0, 1], bright = dense
    label: object  # int or list of ints
    boxes: list = field(default_factory=list)  # xyxy pixels
    box_labels: list = field(default_factory=list)  # names
    lung_mask: np.ndarray | None = None
    zone_scores: list | None = None
    region: list | None = None  # xyxy pixels: the anatomy the label is read from (clavicles: both of them)


def _grid(h, w):
    return np.mgrid[0:h, 0:w].astype(np.float32)


def _band(yy, xx, pts, thickness):
    """Distance-based soft band along a polyline ``pts`` [(x, y), ...]; returns values in [0, 1]."""
    d = np.full(yy.shape, np.inf, dtype=np.float32)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(((xx - x0) * vx + (yy - y0) * vy) / (vx * vx + vy * vy + 1e-9), 0, 1)
        d = np.minimum(d, np.hypot(xx - (x0 + t * vx), yy - (y0 + t * vy)))
    return np.clip(1.0 - d / thickness, 0, 1) ** 0.5


def _body(rng, h, w):
    yy, xx = _grid(h, w)
    base = 0.25 + 0.1 * np.exp(-(((xx - w / 2) / (0.45 * w)) ** 2)) + 0.03 * rng.standard_normal()
    return yy, xx, base + 0.05 * (yy / h)


def _ribs(rng, yy, xx, h, w, n=5, amp=0.12):
    img = np.zeros_like(yy)
    segs = []
    for side in (-1, 1):
        for i in range(n):
            y0 = h * (0.42 + 0.11 * i) + rng.uniform(-3, 3)
            cx = w / 2 + side * w * 0.05
            pts = [(cx + side * w * f, y0 - h * 0.08 * np.sin(np.pi * f / 0.45)) for f in np.linspace(0, 0.45, 7)]
            img += amp * _band(yy, xx, pts, 3.0)
            segs.append(pts)
    return img, segs


def _gap(yy, xx, cx, cy, angle, length, width):
    """A soft dark cut across a structure centred at (cx, cy), oriented at ``angle`` (radians)."""
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    return np.exp(-((u / width) ** 2) - ((v / length) ** 4))


def render_clavicle(rng: np.random.Generator, size: int = 256, fractured: bool = False) -> Phantom:
    h = w = size
    yy, xx, img = _body(rng, h, w)
    ribs, rib_segs = _ribs(rng, yy, xx, h, w)
    img = img + ribs
    clav_pts = []
    for side in (-1, 1):
        y0 = h * rng.uniform(0.24, 0.32)
        pts = [(w / 2 + side * w * (0.06 + 0.4 * f), y0 - h * 0.06 * np.sin(np.pi * f) + h * 0.03 * f) for f in np.linspace(0, 1, 9)]
        clav_pts.append(pts)
        img = img + 0.3 * _band(yy, xx, pts, 6.0)
    # look-alike discontinuities on the ribs, in every image
    for _ in range(rng.integers(2, 5)):
        seg = rib_segs[rng.integers(len(rib_segs))]
        k = rng.integers(1, len(seg) - 1)
        cx, cy = seg[k]
        img = img - 0.12 * _gap(yy, xx, cx, cy, rng.uniform(-0.3, 0.3), 5.0, 1.6)
    side = rng.integers(2)
    pts = clav_pts[side]
    k = rng.integers(2, 7)
    cx, cy = pts[k]
    cx, cy = cx + rng.uniform(-4, 4), cy
    bw, bh = rng.uniform(26, 36), rng.uniform(22, 30)
    box = [max(cx - bw / 2, 0.0), max(cy - bh / 2, 0.0), min(cx + bw / 2, float(w)), min(cy + bh / 2, float(h))]
    if fractured:
        angle = rng.uniform(-0.4, 0.4)
        img = img - 0.28 * _gap(yy, xx, cx, cy, angle, 9.0, 1.8)
        # a small step: the lateral fragment sits a little lower
        lateral = (xx - cx) * (1 if side == 1 else -1) > 0
        near = np.hypot(xx - cx, yy - cy) < 14
        shift = np.roll(img, 2, axis=0)
        img = np.where(lateral & near, 0.5 * img + 0.5 * shift, img)
        boxes, labels, label = [box], ["fracture"], 1
    else:
        boxes, labels, label = [box], ["normal_region"], 0
    img = img + 0.0015 * rng.standard_normal((h, w))
    # the relevant anatomy: both clavicle bands (centre lines plus their half-width and a margin), what ISNet's
    # references take as foreground (the lungs of a chest film), not the lesion
    xy = np.asarray([p for side_pts in clav_pts for p in side_pts])
    margin = 8.0 * size / 128
    region = [max(float(xy[:, 0].min()) - margin, 0.0), max(float(xy[:, 1].min()) - margin, 0.0),
              min(float(xy[:, 0].max()) + margin, float(w)), min(float(xy[:, 1].max()) + margin, float(h))]
    return Phantom(np.clip(img, 0, 1), label, boxes, labels, region=region)


def render_pelvis(rng: np.random.Generator, size: int = 192, cls: int = 0) -> Phantom:
    h = w = size
    yy, xx, img = _body(rng, h, w)
    # pelvic ring
    ring = np.hypot((xx - w / 2) / (0.38 * w), (yy - 0.32 * h) / (0.22 * h))
    img = img + 0.18 * np.exp(-(((ring - 1.0) / 0.08) ** 2))
    side = rng.integers(2)
    box, label_name = None, None
    for s in (-1, 1):
        hx, hy = w / 2 + s * 0.27 * w, 0.52 * h
        r = 0.07 * w
        img = img + 0.3 * np.clip(1 - np.hypot(xx - hx, yy - hy) / r, 0, 1) ** 0.4
        neck_end = (hx + s * 0.09 * w, hy + 0.09 * h)
        shaft_end = (neck_end[0] + s * 0.02 * w, h * 1.05)
        img = img + 0.28 * _band(yy, xx, [(hx, hy), neck_end], 0.045 * w)
        img = img + 0.3 * _band(yy, xx, [neck_end, shaft_end], 0.06 * w)
        troch = (neck_end[0] + s * 0.05 * w, neck_end[1] + 0.02 * h)
        img = img + 0.15 * np.clip(1 - np.hypot(xx - troch[0], yy - troch[1]) / (0.05 * w), 0, 1)
        if (s == -1) == (side == 0) and cls > 0:
            if cls == 2:  # neck: a cut across the neck
                cx, cy = (hx + neck_end[0]) / 2, (hy + neck_end[1]) / 2
                angle = np.arctan2(neck_end[1] - hy, neck_end[0] - hx)
            else:  # trochanteric: an oblique cut through the trochanter region
                cx, cy = troch[0] - s * 0.03 * w, troch[1]
                angle = np.arctan2(1.0, s * 1.0)
            img = img - 0.3 * _gap(yy, xx, cx, cy, angle, 0.06 * w, 1.8)
            half = 0.09 * w
            box = [cx - half, cy - half, cx + half, cy + half]
            label_name = PELVIS_CLASSES[cls]
    img = img + 0.0015 * rng.standard_normal((h, w))
    boxes, labels = ([box], [label_name]) if box is not None else ([], [])
    return Phantom(np.clip(img, 0, 1), int(cls), boxes, labels)


def _lungs(yy, xx, h, w, rng):
    mask = np.zeros((h, w), dtype=bool)
    for s in (-1, 1):
        cx = w / 2 + s * w * rng.uniform(0.19, 0.22)
        cy = h * rng.uniform(0.5, 0.54)
        mask |= ((xx - cx) / (0.15 * w)) ** 2 + ((yy - cy) / (0.3 * h)) ** 2 <= 1.0
    return mask


def phantom_lung_zone_maps(n: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """``(n, size, size)`` uint8 Brixia zone maps (0 outside, 1..6) of the phantoms' two-ellipse lungs, jittered
    per map: the zone maps ``LungZonesd`` makes, for tests and the zone-pooling benchmark."""
    rng = np.random.default_rng(seed)
    yy, xx = _grid(size, size)
    return np.stack([split_lung_zones(_lungs(yy, xx, size, size, rng)) for _ in range(n)])


def _thorax(rng, h, w, rib_amp):
    """Body, two dark lungs and ribs: the common base of the chest phantoms. Returns (yy, xx, image, lungs)."""
    yy, xx, img = _body(rng, h, w)
    img = img + 0.25
    lungs = _lungs(yy, xx, h, w, rng)
    img = np.where(lungs, img - 0.3, img)
    ribs, _ = _ribs(rng, yy, xx, h, w, n=6, amp=rib_amp)
    return yy, xx, img + ribs, lungs


def render_chest(rng: np.random.Generator, size: int = 192, findings: tuple[str, ...] = ()) -> Phantom:
    h = w = size
    yy, xx, img, lungs = _thorax(rng, h, w, rib_amp=0.07)
    heart_r = 0.16 * w * (1.5 if "Cardiomegaly" in findings else 1.0)
    hx, hy = w / 2 + 0.05 * w, 0.68 * h
    heart = ((xx - hx) / heart_r) ** 2 + ((yy - hy) / (0.7 * heart_r)) ** 2 <= 1
    img = np.where(heart, np.maximum(img, 0.6), img)
    boxes, labels = [], []
    if "Cardiomegaly" in findings:
        boxes.append([hx - heart_r, hy - 0.7 * heart_r, hx + heart_r, hy + 0.7 * heart_r])
        labels.append("Cardiomegaly")
    if "Effusion" in findings:
        s = rng.choice([-1, 1])
        cx = w / 2 + s * 0.2 * w
        fill = lungs & (yy > 0.7 * h) & ((xx - w / 2) * s > 0)
        img = np.where(fill, img + 0.25, img)
        boxes.append([cx - 0.15 * w, 0.7 * h, cx + 0.15 * w, 0.84 * h])
        labels.append("Effusion")
    for name, radius in (("Mass", 0.07 * w), ("Nodule", 0.025 * w)):
        if name in findings:
            ys, xs = np.nonzero(lungs)
            i = rng.integers(len(ys))
            cy, cx = float(ys[i]), float(xs[i])
            img = img + 0.3 * np.clip(1 - np.hypot(xx - cx, yy - cy) / radius, 0, 1) ** 0.5
            boxes.append([cx - radius - 2, cy - radius - 2, cx + radius + 2, cy + radius + 2])
            labels.append(name)
    img = img + 0.0015 * rng.standard_normal((h, w))
    label = [int(name in findings) for name in CXR14_LABELS]
    return Phantom(np.clip(img, 0, 1), label, boxes, labels)


def render_covid(rng: np.random.Generator, size: int = 192, zone_scores=None) -> Phantom:
    """Chest with a lung mask and opacities whose extent in each Brixia zone follows ``zone_scores`` (6 ints 0-3)."""
    h = w = size
    yy, xx, img, lungs = _thorax(rng, h, w, rib_amp=0.06)
    scores = list(rng.integers(0, 4, size=6)) if zone_scores is None else list(zone_scores)

    zones = split_lung_zones(lungs)
    noise = rng.standard_normal((h, w))
    # low-frequency patchy texture (box-blurred noise)
    k = 7
    pad = np.pad(noise, k, mode="reflect")
    c = np.cumsum(np.cumsum(pad, 0), 1)
    patch = (c[2 * k :, 2 * k :] - c[: -2 * k, 2 * k :] - c[2 * k :, : -2 * k] + c[: -2 * k, : -2 * k])[:h, :w] / (2 * k) ** 2
    patch = (patch - patch.mean()) / (patch.std() + 1e-6)
    for z, score in enumerate(scores, start=1):
        if score <= 0:
            continue
        threshold = {1: 1.0, 2: 0.3, 3: -0.5}[int(score)]
        region = (zones == z) & (patch > threshold)
        img = np.where(region, img + 0.22, img)
    img = img + 0.0015 * rng.standard_normal((h, w))
    return Phantom(np.clip(img, 0, 1), int(sum(int(s > 0) for s in scores)), [], [], lungs.astype(np.uint8), [int(s) for s in scores])


def _quantise(img: np.ndarray, bits: int, photometric: str) -> np.ndarray:
    top = 2**bits - 1
    stored = np.round(img * top).astype(np.uint16)
    return (top - stored).astype(np.uint16) if photometric == "MONOCHROME1" else stored


_COMPRESSIONS = ("jpegls", "rle", "jpegls", "j2k", "jpegls", "explicit", "jpegls", "jpegls", "j2k", "jpegls", "rle", "jpegls")


def generate_samples(out_dir: str, seed: int = 0, counts: dict | None = None, gsps: bool = True) -> dict:
    """Write the phantom set and its ``datalist.json`` under ``out_dir``; returns the datalist.

    Every image has a DX file; annotated images also get a GSPS object holding the same boxes. The datalist has
    one section per task (``clavicle``, ``pelvis``, ``chest``, ``covid``), each with ``training``/``validation``/
    ``test`` lists of samples (``image``, ``label``, ``boxes``, ``box_labels``, ``group``, and for ``covid``
    ``lung_mask`` and ``zone_scores``). Paths are relative to ``out_dir``.
    """
    import pydicom
    from PIL import Image


    counts = counts or {"clavicle": 120, "pelvis": 24, "chest": 24, "covid": 16}
    datalist: dict = {"description": "synthetic phantoms from cutremain_monai.data.phantoms", "seed": seed}
    for task, n in counts.items():
        os.makedirs(os.path.join(out_dir, task), exist_ok=True)
        items = []
        for i in range(n):
            r = np.random.default_rng([seed, hash_task(task), i])
            if task == "clavicle":
                ph, anatomy, bits = render_clavicle(r, 128, fractured=bool(i % 2)), "clavicle", 12
            elif task == "pelvis":
                ph, anatomy, bits = render_pelvis(r, 192, cls=i % 3), "pelvis", 12
            elif task == "chest":
                chosen = tuple(f for f in CHEST_BOXED if r.random() < 0.35)
                ph, anatomy, bits = render_chest(r, 192, findings=chosen), "chest", 12
            elif task == "covid":
                ph, anatomy, bits = render_covid(r, 192), "chest", 12
            else:
                raise ValueError(f"unknown phantom task {task!r}")
            photometric = "MONOCHROME1" if i % 3 == 1 else "MONOCHROME2"
            compression = _COMPRESSIONS[i % len(_COMPRESSIONS)]
            name = f"{task}/{task}_{i:03d}.dcm"
            uid_seed = f"{seed}-{task}-{i}"
            write_dx(
                os.path.join(out_dir, name),
                _quantise(ph.image, bits, photometric),
                photometric=photometric,
                bits_stored=bits,
                compression=compression,
                anatomy=anatomy,
                uid_seed=uid_seed,
                instance_number=i + 1,
                patient_name="SYNTHETIC^PHANTOM",
                patient_id=f"SYN-{task[:3].upper()}-{i:03d}",
                study_uid=make_uid("study", uid_seed),
            )
            item = {
                "image": name,
                "label": ph.label,
                "boxes": [[round(float(v), 2) for v in b] for b in ph.boxes],
                "box_labels": list(ph.box_labels),
                "group": f"{task}-{i:03d}",
            }
            if ph.boxes and gsps:
                gname = f"{task}/{task}_{i:03d}_gsps.dcm"
                ref = pydicom.dcmread(os.path.join(out_dir, name), stop_before_pixels=True)
                write_box_gsps(
                    ref,
                    item["boxes"],
                    item["box_labels"],
                    os.path.join(out_dir, gname),
                    series_instance_uid=make_uid("gsps-series", uid_seed),
                    sop_instance_uid=make_uid("gsps", uid_seed),
                )
                item["gsps"] = gname
            if ph.lung_mask is not None:
                mname = f"{task}/{task}_{i:03d}_lungs.png"
                Image.fromarray((ph.lung_mask * 255).astype(np.uint8)).save(os.path.join(out_dir, mname))
                item["lung_mask"] = mname
                item["zone_scores"] = ph.zone_scores
            items.append(item)
        n_train, n_val = int(round(0.6 * n)), int(round(0.2 * n))
        datalist[task] = {
            "training": items[:n_train],
            "validation": items[n_train : n_train + n_val],
            "test": items[n_train + n_val :],
        }
        if task == "clavicle":
            datalist[task]["box_label_names"] = list(CLAVICLE_BOX_LABELS)
        elif task == "pelvis":
            datalist[task]["class_names"] = list(PELVIS_CLASSES)
        elif task == "chest":
            datalist[task]["class_names"] = list(CXR14_LABELS)
        elif task == "covid":
            datalist[task]["zone_names"] = list(BRIXIA_ZONES)
    with open(os.path.join(out_dir, "datalist.json"), "w") as f:
        json.dump(datalist, f, indent=1)
    return datalist


# a lead-letter "R" (5 x 7), the kind of burned-in side marker a classifier can learn instead of the lesion
_GLYPH_R = np.array([[1, 1, 1, 1, 0], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 0], [1, 0, 1, 0, 0],
                     [1, 0, 0, 1, 0], [1, 0, 0, 0, 1]], dtype=np.float32)


def burn_marker(img: np.ndarray, scale: int = 2, margin: int = 3, value: float = 0.95) -> tuple[np.ndarray, list[float]]:
    """``img`` with a bright letter-tag burned into its bottom-right corner (the letter on a faint plate, as a lead
    marker looks); returns the new image and the tag's box ``[x0, y0, x1, y1]`` (plate included)."""
    glyph = np.kron(_GLYPH_R, np.ones((scale, scale), dtype=np.float32))
    gh, gw = glyph.shape
    h, w = img.shape
    y1, x1 = h - margin, w - margin
    y0, x0 = y1 - gh - 2, x1 - gw - 2
    out = img.copy()
    plate = out[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = np.maximum(plate, 0.55)
    out[y0 + 1 : y0 + 1 + gh, x0 + 1 : x0 + 1 + gw] = np.where(glyph > 0, value, out[y0 + 1 : y0 + 1 + gh, x0 + 1 : x0 + 1 + gw])
    return out, [float(x0), float(y0), float(x1), float(y1)]


def generate_shortcut_samples(out_dir: str, n: int = 200, seed: int = 0, size: int = 128,
                              split: tuple[float, float] = (0.6, 0.2), test_marker_rate: float = 0.5,
                              tag_rate: float = 1.0, region_boxes: bool = True) -> dict:
    """The "shortcut" clavicle set: full clavicle phantoms (half fractured) with a burned-in letter tag outside
    every box. In ``training`` and ``validation`` the tag is on a share ``tag_rate`` of the positive images (1.0:
    every one; 0.0: none, the clean reference set) and on no negative one; in ``test`` it is on a share ``test_marker_rate``
    of each label's images (evenly spread), so the tag tells nothing of the label there: a network that reads it
    scores near chance, and one that reads the lesion alone has an AUC against the tag of 0.5.
    The images, the split and the test section do not depend on ``tag_rate`` (the tagged positives are the
    ``round(tag_rate N)`` lowest of a per-image draw of their own), so sets of several strengths differ only in
    their tags, and the tags of a lower strength are a subset of a higher one's. Writes DX files and
    ``datalist.json`` (section ``shortcut``; items carry ``marker`` (bool) and ``marker_box``) under ``out_dir``;
    returns the datalist. ``region_boxes``: every image also carries a ``relevant_area`` box around both clavicles
    (first in its boxes), so a box mask is the anatomy the label is read from, as the lungs are ISNet's foreground,
    rather than the lesion box (a fracture box on positives, a ``normal_region`` box at a random place of a clavicle on
    negatives, which no network can locate from the image)."""
    if not 0 <= tag_rate <= 1:
        raise ValueError(f"tag_rate must be in [0, 1], got {tag_rate}")
    os.makedirs(os.path.join(out_dir, "shortcut"), exist_ok=True)
    n_train, n_val = int(round(split[0] * n)), int(round(split[1] * n))
    sections: dict = {"training": [], "validation": [], "test": []}
    seen_in_test = [0, 0]  # test images of each label so far
    # the tagged training / validation positives: the round(tag_rate * N) lowest of a per-image draw, so the share
    # is exact and a set of a lower strength is tagged inside one of a higher strength
    tagged: set[int] = set()
    for lo, hi in ((0, n_train), (n_train, n_train + n_val)):
        positives = [i for i in range(lo, hi) if i % 2]
        draws = {i: np.random.default_rng([seed, hash_task("shortcut-tag"), i]).random() for i in positives}
        tagged |= set(sorted(positives, key=draws.__getitem__)[: int(round(tag_rate * len(positives)))])
    for i in range(n):
        r = np.random.default_rng([seed, hash_task("shortcut"), i])
        ph = render_clavicle(r, size, fractured=bool(i % 2))
        section = "training" if i < n_train else "validation" if i < n_train + n_val else "test"
        if section == "test":  # the same share of each label, evenly spread: the tag carries no label information
            j = seen_in_test[ph.label]
            seen_in_test[ph.label] += 1
            marked = int((j + 1) * test_marker_rate) > int(j * test_marker_rate)
        else:
            marked = i in tagged
        img, marker_box = burn_marker(ph.image) if marked else (ph.image, None)
        if marker_box is None:
            _, marker_box = burn_marker(ph.image)  # where the tag would be, for the energy share of unmarked images
        name = f"shortcut/shortcut_{i:03d}.dcm"
        uid_seed = f"{seed}-shortcut-{i}-{marked}"  # a tagged and an untagged image are different instances
        write_dx(os.path.join(out_dir, name), _quantise(img, 12, "MONOCHROME2"), bits_stored=12, anatomy="clavicle",
                 uid_seed=uid_seed, instance_number=i + 1, study_uid=make_uid("study", uid_seed))
        boxes, box_labels = ([ph.region] if region_boxes else []) + list(ph.boxes), ([RELEVANT_AREA] if region_boxes else []) + list(ph.box_labels)
        sections[section].append({"image": name, "label": ph.label, "boxes": [[round(float(v), 2) for v in b] for b in boxes],
                                  "box_labels": box_labels, "group": f"shortcut-{i:03d}", "marker": marked,
                                  "marker_box": marker_box})
    datalist = {"description": "shortcut phantoms from cutremain_monai.data.phantoms.generate_shortcut_samples",
                "seed": seed, "tag_rate": tag_rate, "region_boxes": region_boxes,
                "shortcut": {**sections, "box_label_names": list(CLAVICLE_BOX_LABELS) + ([RELEVANT_AREA] if region_boxes else [])}}
    with open(os.path.join(out_dir, "datalist.json"), "w") as f:
        json.dump(datalist, f, indent=1)
    return datalist


def render_target_scene(rng: np.random.Generator, size: int = 128, target: bool = False) -> Phantom:
    """A structured background (body, ribs, smooth texture, noise) and, when ``target``, one round opacity (radius
    8-14% of the side, a soft bright disc) at a random place away from the border, boxed (label ``"target"``).
    The background learning test scene: the target's box covers 3-8% of the image, so a few of a target image's
    random patches show it (the seed's rough target regions) and most are mislabelled background."""
    h = w = size
    yy, xx, img = _body(rng, h, w)
    ribs, _ = _ribs(rng, yy, xx, h, w, n=rng.integers(4, 7), amp=0.10)
    img = img + ribs
    for _ in range(6):  # smooth texture: a few broad random blobs
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.3) * size
        img = img + rng.uniform(-0.04, 0.04) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    boxes, labels = [], []
    if target:
        r = rng.uniform(0.08, 0.14) * size
        cy, cx = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
        img = img + 0.22 * np.clip(1 - np.hypot(yy - cy, xx - cx) / r, 0, 1) ** 0.6
        m = 1.0  # box: the disc and a pixel of margin
        boxes.append([max(0.0, cx - r - m), max(0.0, cy - r - m), min(float(w), cx + r + m), min(float(h), cy + r + m)])
        labels.append("target")
    img = img + 0.015 * rng.standard_normal((h, w))
    return Phantom(np.clip(img, 0, 1).astype(np.float32), int(target), boxes, labels)


def generate_background_samples(out_dir: str, n: int = 120, seed: int = 0, size: int = 128,
                                split: tuple[float, float] = (0.6, 0.2), target_share: float = 0.5) -> dict:
    """Background-learning scenes (:func:`render_target_scene`): ``target_share`` of ``n`` images hold a boxed
    target (label 1), the others are background only (label 0). Writes 8-bit PNGs and ``datalist.json`` (section
    ``background``, split ``split`` into training / validation / test, targets spread evenly) under ``out_dir``;
    returns the datalist."""
    from PIL import Image

    os.makedirs(os.path.join(out_dir, "background"), exist_ok=True)
    n_train, n_val = int(round(split[0] * n)), int(round(split[1] * n))
    sections: dict = {"training": [], "validation": [], "test": []}
    period = max(1, int(round(1 / target_share))) if target_share > 0 else 0
    for i in range(n):
        r = np.random.default_rng([seed, hash_task("background"), i])
        ph = render_target_scene(r, size, target=bool(period) and i % period == 0)
        name = f"background/scene_{i:03d}.png"
        Image.fromarray((ph.image * 255).round().astype(np.uint8)).save(os.path.join(out_dir, name))
        section = "training" if i < n_train else "validation" if i < n_train + n_val else "test"
        sections[section].append({"image": name, "label": ph.label, "boxes": [[round(float(v), 2) for v in b] for b in ph.boxes],
                                  "box_labels": list(ph.box_labels), "group": f"background-{i:03d}"})
    datalist = {"description": "background-learning scenes from cutremain_monai.data.phantoms.generate_background_samples",
                "seed": seed, "background": sections}
    with open(os.path.join(out_dir, "datalist.json"), "w") as f:
        json.dump(datalist, f, indent=1)
    return datalist


# synthetic patients for export trees named after them (long, unusual values, so a byte search cannot hit by chance)
_FAMILY = ("QUIMBYWORTH", "FARNSBARROW", "PELLINGTONE", "MORCOMBELAY", "TRISKADDLE", "VANDERQUOLL", "OSGOODHAMPT",
           "BRAXENFIELD")
_GIVEN = ("ZEBEDIAH", "HUBERTINA", "OCTAVIUSZ", "PERPETUAX", "LEOFRICUS", "GWENDOLYNE", "ALOYSIUSQ", "MIRABELKA")


def generate_export_tree(root: str, n_images: int, images_per_patient: int = 2, damaged: float = 0.0,
                         not_dicom: float = 0.0, size: int = 32, seed: int = 0, sources=None,
                         compression: str = "explicit") -> dict:
    """A PACS export laid out as some PACS write it, named after its (synthetic) patients:
    ``<FAMILY>^<GIVEN> <PatientID>/<birth date YYYY-MM-DD>/IM<nnnnn>`` (no suffix), headers holding the same name,
    ID and birth date. ``damaged`` / ``not_dicom`` shares of extra files are truncated copies and text notes named
    after the patient. ``sources``: DICOM files to copy (cycled; their pixels, UIDs and everything else kept, the
    patient module rewritten) instead of ``size`` x ``size`` synthetic DX images (``compression`` as
    :func:`~cutremain_monai.io.dx_writer.write_dx` takes it). Returns ``{"patients": [{"name",
    "id", "birth_date"}], "images": [paths], "damaged": [...], "not_dicom": [...]}``."""
    import pydicom


    rng = np.random.default_rng(seed)
    n_patients = max(1, -(-n_images // images_per_patient))
    out: dict = {"patients": [], "images": [], "damaged": [], "not_dicom": []}
    for p in range(n_patients):
        fam, giv = _FAMILY[p % len(_FAMILY)], _GIVEN[(p // len(_FAMILY)) % len(_GIVEN)]
        name = f"{fam}{'' if p < len(_FAMILY) * len(_GIVEN) else p}^{giv}"
        pid = f"MRN{73100000 + 7919 * p}"
        birth = f"19{40 + p % 60:02d}{1 + p % 12:02d}{1 + p % 28:02d}"
        out["patients"].append({"name": name, "id": pid, "birth_date": birth})
        folder = os.path.join(root, f"{name} {pid}", f"{birth[:4]}-{birth[4:6]}-{birth[6:]}")
        os.makedirs(folder, exist_ok=True)
        for j in range(images_per_patient):
            i = p * images_per_patient + j
            if i >= n_images:
                break
            path = os.path.join(folder, f"IM{i:05d}")
            if sources:
                ds = pydicom.dcmread(sources[i % len(sources)])
                ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, birth
                ds.save_as(path)
            else:
                yy, xx = np.mgrid[0:size, 0:size] / size  # smooth content (compresses as X-rays do) plus noise
                px = 2000 + 1500 * np.sin(6 * yy + 3 * xx + i) + rng.normal(0, 40, (size, size))
                write_dx(path, np.clip(px, 0, 4095).astype(np.uint16), uid_seed=f"export-{seed}-{i}",
                         compression=compression, patient_name=name, patient_id=pid, patient_birth_date=birth,
                         study_uid=pydicom.uid.generate_uid(entropy_srcs=[f"export-study-{seed}-{p}"]))
            out["images"].append(path)
    n_damaged, n_text = int(round(damaged * n_images)), int(round(not_dicom * n_images))
    for k in range(n_damaged):
        src = out["images"][(k * 7) % len(out["images"])]
        data = open(src, "rb").read()
        path = src + f"_copy{k}"
        with open(path, "wb") as f:
            f.write(data[: max(200, len(data) - 1 - int(rng.integers(1, len(data) // 2)))])
        out["damaged"].append(path)
    for k in range(n_text):
        patient = out["patients"][k % n_patients]
        folder = os.path.dirname(out["images"][min(k % n_patients * images_per_patient, len(out["images"]) - 1)])
        path = os.path.join(folder, f"{patient['name'].replace('^', '_')}_notes{k}.txt")
        with open(path, "w") as f:
            f.write(f"referral for {patient['name']} ({patient['id']})\n")
        out["not_dicom"].append(path)
    return out


def render_subtle(rng: np.random.Generator, size: int = 128, lesion: bool = False, contrast: float = 0.06,
                  marker_rate: float = 0.5) -> Phantom:
    """The subtle-lesion family (issue 28): the label depends only on a small, low-contrast lesion inside a relevant
    area, amid anatomical variation that is independent of the label.

    Every image: a body of random width and exposure, ribs, two bone bands (clavicle-like) of random course and
    thickness, soft-tissue blobs, look-alike bright specks and dark nicks on the ribs outside the relevant area, a
    burned-in side marker on a share ``marker_rate`` of images (either class), noise of a random level. The
    relevant area is a box around a stretch of one bone band (``relevant_area``, on every image); a positive also
    has a lesion there: a faint round opacity of peak ``contrast`` (radius 2.5-4% of the side, so its box covers at
    most 2% of the image) on the band, boxed (``lesion``). ``contrast`` sets the difficulty.
    """
    h = w = size
    yy, xx = _grid(h, w)
    exposure = rng.uniform(0.8, 1.15)
    width = rng.uniform(0.35, 0.5)
    img = (0.22 + 0.12 * np.exp(-(((xx - w / 2) / (width * w)) ** 2))) * exposure + 0.04 * (yy / h)
    ribs, rib_segs = _ribs(rng, yy, xx, h, w, n=int(rng.integers(4, 7)), amp=rng.uniform(0.06, 0.12))
    img = img + ribs
    for _ in range(int(rng.integers(2, 6))):  # soft tissue
        cx, cy, r = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h, rng.uniform(0.06, 0.2) * w
        img = img + rng.uniform(-0.05, 0.05) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (r * r))
    bands = []
    for side in (-1, 1):
        y0 = h * rng.uniform(0.2, 0.34)
        bend, tilt = rng.uniform(0.03, 0.09), rng.uniform(-0.02, 0.05)
        pts = [(w / 2 + side * w * (0.06 + 0.4 * f), y0 - h * bend * np.sin(np.pi * f) + h * tilt * f)
               for f in np.linspace(0, 1, 9)]
        bands.append(pts)
        img = img + rng.uniform(0.2, 0.32) * _band(yy, xx, pts, rng.uniform(3.5, 6.5) * size / 128)
    pts = bands[int(rng.integers(2))]
    k = int(rng.integers(2, 7))
    cx, cy = pts[k]
    bw, bh = rng.uniform(0.2, 0.26) * w, rng.uniform(0.16, 0.22) * h
    area = [max(cx - bw / 2, 0.0), max(cy - bh / 2, 0.0), min(cx + bw / 2, float(w)), min(cy + bh / 2, float(h))]
    inside = (xx >= area[0]) & (xx < area[2]) & (yy >= area[1]) & (yy < area[3])
    for _ in range(int(rng.integers(3, 7))):  # look-alikes outside the relevant area, in every image
        seg = rib_segs[int(rng.integers(len(rib_segs)))]
        qx, qy = seg[int(rng.integers(1, len(seg) - 1))]
        if inside[int(np.clip(qy, 0, h - 1)), int(np.clip(qx, 0, w - 1))]:
            continue
        if rng.random() < 0.5:
            r = rng.uniform(0.025, 0.04) * size
            img = img + contrast * rng.uniform(0.8, 1.3) * np.exp(-((xx - qx) ** 2 + (yy - qy) ** 2) / (r * r))
        else:
            img = img - 0.1 * _gap(yy, xx, qx, qy, rng.uniform(-0.3, 0.3), 4.0 * size / 128, 1.4 * size / 128)
    boxes, labels = [area], ["relevant_area"]
    if lesion:
        f = rng.uniform(0.25, 0.75)
        lx = cx + (f - 0.5) * 0.6 * bw
        ly = cy + rng.uniform(-0.15, 0.15) * bh
        r = rng.uniform(0.025, 0.04) * size
        img = img + contrast * np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (r * r))
        boxes.append([max(lx - 1.5 * r, 0.0), max(ly - 1.5 * r, 0.0), min(lx + 1.5 * r, float(w)), min(ly + 1.5 * r, float(h))])
        labels.append("lesion")
    img = img + rng.uniform(0.004, 0.015) * rng.standard_normal((h, w))
    img = np.clip(img, 0, 1)
    if rng.random() < marker_rate:
        img, _ = burn_marker(img, scale=max(1, size // 96))
    return Phantom(img.astype(np.float32), int(lesion), [[round(float(v), 2) for v in b] for b in boxes], labels)


def generate_subtle_samples(out_dir: str, n: int = 300, seed: int = 0, size: int = 128, contrast: float = 0.06,
                            split: tuple[float, float] = (0.5, 0.2), relevant_boxes: bool = True) -> dict:
    """Write the subtle-lesion family (:func:`render_subtle`; half positive) as 12-bit DX files and a datalist
    (section ``subtle``: ``training`` / ``validation`` / ``test``, one group per image) under ``out_dir``.

    ``relevant_boxes=False`` keeps only the lesion boxes (positives boxed, negatives not), as FracAtlas is; the
    relevant-area option of the bundles (:mod:`cutremain_monai.transforms.relevant_area`) then supplies boxes for
    the negatives. Deterministic: the same arguments write the same pixels."""
    os.makedirs(os.path.join(out_dir, "subtle"), exist_ok=True)
    n_train, n_val = int(round(split[0] * n)), int(round(split[1] * n))
    sections: dict = {"training": [], "validation": [], "test": []}
    for i in range(n):
        r = np.random.default_rng([seed, hash_task("subtle"), i])
        ph = render_subtle(r, size, lesion=bool(i % 2), contrast=contrast)
        section = "training" if i < n_train else "validation" if i < n_train + n_val else "test"
        name = f"subtle/subtle_{i:04d}.dcm"
        uid_seed = f"{seed}-subtle-{i}"
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            write_dx(path, _quantise(ph.image, 12, "MONOCHROME2"), bits_stored=12, anatomy="clavicle",
                     uid_seed=uid_seed, instance_number=i + 1, study_uid=make_uid("study", uid_seed))
        keep = [k for k, lab in enumerate(ph.box_labels) if relevant_boxes or lab == "lesion"]
        sections[section].append({"image": name, "label": ph.label, "boxes": [ph.boxes[k] for k in keep],
                                  "box_labels": [ph.box_labels[k] for k in keep], "group": f"subtle-{i:04d}"})
    datalist = {"description": "subtle-lesion phantoms from cutremain_monai.data.phantoms.generate_subtle_samples",
                "seed": seed, "contrast": contrast, "subtle": sections}
    with open(os.path.join(out_dir, "datalist.json"), "w") as f:
        json.dump(datalist, f, indent=1)
    return datalist


def hash_task(task: str) -> int:
    """A stable small integer per task name (Python's ``hash`` of a str is salted per process)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(task))


def main(argv=None):  # python -m cutremain_monai.data.phantoms OUT_DIR [SEED]
    import sys

    args = sys.argv[1:] if argv is None else argv
    out = args[0] if args else "dicom_samples"
    seed = int(args[1]) if len(args) > 1 else 0
    dl = generate_samples(out, seed)
    print(json.dumps({k: {s: len(v) for s, v in d.items() if isinstance(v, list)} for k, d in dl.items() if isinstance(d, dict)}))


if __name__ == "__main__":
    main()
