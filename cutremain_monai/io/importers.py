"""Importers from common annotation formats to the datalist items of :mod:`cutremain_monai.io.datalist`.

Each returns a list of items (``image`` absolute path, ``label``, ``boxes`` xyxy pixels of the stored image,
``box_labels``, ``group``). Patient identifiers never enter an item: ``group`` is a salted SHA-256 of the source's
patient id, which keeps patient-wise splits possible without writing the id. A malformed row is a ``ValueError``
naming the file and the line; boxes are validated against the image size when it is known
(:func:`cutremain_monai.io.boxes.validate_boxes`: clipped or dropped with a warning naming the file).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from collections import OrderedDict

import numpy as np

from cutremain_monai.constants import BRIXIA_ZONES, CXR14_LABELS
from cutremain_monai.io.boxes import validate_boxes, xywh_to_xyxy

__all__ = [
    "pseudonym",
    "import_csv",
    "import_nih_cxr14",
    "import_coco",
    "import_fracatlas_manifest",
    "import_yolo",
    "import_brixia",
]

_SALT = "cutremain_monai-group-v1"


def pseudonym(patient_id) -> str:
    """A stable, non-reversible group key for a patient id (never the id itself)."""
    return hashlib.sha256(f"{_SALT}:{patient_id}".encode()).hexdigest()[:12]


def _image_size(path: str) -> tuple[int, int] | None:
    """(H, W) from the file header (PIL for raster images, pydicom for DICOM); None when unreadable."""
    try:
        if path.lower().endswith((".dcm", ".dicom")):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        from PIL import Image

        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # the image itself is validated later by the reader / ingest, with its own message
        return None


def _finish(image: str, label, boxes, box_labels, group, size=None, **extra) -> dict:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if size is not None and len(boxes):
        boxes, labs, _ = validate_boxes(boxes, size, np.arange(len(boxes)), source=image)
        box_labels = [box_labels[int(i)] for i in labs]
    item = {"image": os.path.abspath(image), "label": label, "boxes": boxes.round(2).tolist(), "box_labels": list(box_labels), "group": group}
    item.update(extra)
    return item


def import_csv(path: str, image_root: str | None = None, check_sizes: bool = True) -> list[dict]:
    """Plain CSV, one row per box: ``path,label,x0,y0,x1,y1,box_label`` (header optional).

    A row with empty box fields lists an image without boxes. Rows of the same path are merged (its label must
    agree). Integer labels stay ints; ``a|b`` style labels are not interpreted.
    """
    root = image_root or os.path.dirname(os.path.abspath(path))
    items: OrderedDict[str, dict] = OrderedDict()
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or (lineno == 1 and row[0].strip().lower() in ("path", "image", "filename")):
                continue
            if len(row) not in (2, 6, 7):
                raise ValueError(f"{path}:{lineno}: expected path,label[,x0,y0,x1,y1[,box_label]], got {len(row)} fields")
            img = row[0].strip()
            img = img if os.path.isabs(img) else os.path.join(root, img)
            try:
                label = int(row[1])
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: label {row[1]!r} is not an integer") from e
            item = items.setdefault(img, {"label": label, "boxes": [], "box_labels": []})
            if item["label"] != label:
                raise ValueError(f"{path}:{lineno}: label {label} disagrees with earlier label {item['label']} for {img}")
            coords = row[2:6]
            if len(row) >= 6 and any(c.strip() for c in coords):
                try:
                    box = [float(c) for c in coords]
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: box coordinates {coords} are not numbers") from e
                item["boxes"].append(box)
                item["box_labels"].append(row[6].strip() if len(row) == 7 else "lesion")
    out = []
    for img, it in items.items():
        size = _image_size(img) if check_sizes else None
        out.append(_finish(img, it["label"], it["boxes"], it["box_labels"], pseudonym(img), size))
    return out


def import_nih_cxr14(
    data_entry_csv: str, image_dir: str, bbox_csv: str | None = None, only_present: bool = True
) -> list[dict]:
    """NIH ChestX-ray14: ``Data_Entry_2017*.csv`` (+ ``BBox_List_2017.csv[.gz]``) to 14-label items.

    ``label`` is the 14-vector in :data:`cutremain_monai.constants.CXR14_LABELS` order ("No Finding" = all zero);
    boxes (xywh in the 1024 px images) become xyxy with the finding name as box label ("Infiltrate" is mapped to
    "Infiltration"). ``only_present`` keeps rows whose image file exists in ``image_dir``.
    """
    boxes: dict[str, list] = {}
    if bbox_csv:
        opener = gzip.open if bbox_csv.endswith(".gz") else open
        with opener(bbox_csv, "rt", newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    name, finding = row[0], row[1]
                    x, y, w, h = (float(v) for v in row[2:6])
                except (ValueError, IndexError) as e:
                    raise ValueError(f"{bbox_csv}:{lineno}: malformed box row {row}") from e
                finding = "Infiltration" if finding == "Infiltrate" else finding
                if finding not in CXR14_LABELS:
                    raise ValueError(f"{bbox_csv}:{lineno}: unknown finding {finding!r}")
                boxes.setdefault(name, []).append(([x, y, x + w, y + h], finding))
    out = []
    with open(data_entry_csv, newline="") as f:
        reader = csv.DictReader(f)
        for lineno, row in enumerate(reader, start=2):
            try:
                name, findings, pid = row["Image Index"], row["Finding Labels"], row["Patient ID"]
            except KeyError as e:
                raise ValueError(f"{data_entry_csv}:{lineno}: missing column {e}") from e
            path = os.path.join(image_dir, name)
            if only_present and not os.path.exists(path):
                continue
            names = [] if findings == "No Finding" else findings.split("|")
            unknown = [n for n in names if n not in CXR14_LABELS]
            if unknown:
                raise ValueError(f"{data_entry_csv}:{lineno}: unknown finding(s) {unknown}")
            label = [int(n in names) for n in CXR14_LABELS]
            bl = boxes.get(name, [])
            size = (1024, 1024)  # boxes are in the distributed 1024 px frame, not the original scan size
            out.append(_finish(path, label, [b for b, _ in bl], [n for _, n in bl], pseudonym(pid), size))
    return out


def import_coco(coco_json: str, image_dir: str, positive_categories: list[str] | None = None) -> list[dict]:
    """COCO detection JSON (e.g. FracAtlas): one item per image; ``label`` 1 if it has a box of a positive category.

    ``positive_categories`` defaults to all categories. Boxes are COCO ``[x, y, w, h]`` in the stored image.
    """
    with open(coco_json) as f:
        coco = json.load(f)
    cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
    positive = set(positive_categories) if positive_categories else set(cats.values())
    anns: dict[int, list] = {}
    for i, a in enumerate(coco.get("annotations", [])):
        if "bbox" not in a or len(a["bbox"]) != 4:
            raise ValueError(f"{coco_json}: annotations[{i}] has no [x, y, w, h] bbox")
        if a.get("category_id") not in cats:
            raise ValueError(f"{coco_json}: annotations[{i}] has unknown category_id {a.get('category_id')}")
        anns.setdefault(a["image_id"], []).append(a)
    out = []
    for img in coco.get("images", []):
        a = anns.get(img["id"], [])
        names = [cats[x["category_id"]] for x in a]
        boxes = xywh_to_xyxy([x["bbox"] for x in a]) if a else np.zeros((0, 4))
        size = (img["height"], img["width"]) if "height" in img and "width" in img else None
        label = int(any(n in positive for n in names))
        out.append(_finish(os.path.join(image_dir, img["file_name"]), label, boxes, names, pseudonym(img["file_name"]), size))
    return out


def import_fracatlas_manifest(manifest_csv: str, image_dir: str, region: str | None = None) -> list[dict]:
    """The FracAtlas manifest in ``../shared/data/fracture`` (``fractured``, ``fracture_bboxes_xywh``, ``region``).

    ``region`` keeps rows whose ``|``-joined region flags contain it (``"hip"``, ``"shoulder"``).
    """
    out = []
    with open(manifest_csv, newline="") as f:
        for lineno, row in enumerate(csv.DictReader(f), start=2):
            if region and region not in row.get("region", "").split("|"):
                continue
            try:
                boxes = json.loads(row["fracture_bboxes_xywh"] or "[]")
                label = int(row["fractured"])
            except (KeyError, ValueError) as e:
                raise ValueError(f"{manifest_csv}:{lineno}: malformed row ({e})") from e
            path = os.path.join(image_dir, row["image_id"])
            xyxy = xywh_to_xyxy(boxes) if boxes else np.zeros((0, 4))
            out.append(_finish(path, label, xyxy, ["fracture"] * len(xyxy), pseudonym(row["image_id"]), _image_size(path)))
    return out


def import_yolo(
    image_dir: str, label_dir: str, class_names: list[str] | None = None, positive_classes: list[int] | None = None
) -> list[dict]:
    """YOLO txt (``class cx cy w h`` normalised to 0-1), one file per image with the same stem.

    Pixel boxes need the image size, read from the image header; ``label`` is 1 if the image has a box of a
    positive class (default: any class).
    """
    exts = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm")
    out = []
    for name in sorted(os.listdir(image_dir)):
        if not name.lower().endswith(exts):
            continue
        path = os.path.join(image_dir, name)
        txt = os.path.join(label_dir, os.path.splitext(name)[0] + ".txt")
        size = _image_size(path)
        boxes, labels, classes = [], [], []
        if os.path.exists(txt):
            with open(txt) as f:
                for lineno, line in enumerate(f, start=1):
                    parts = line.split()
                    if not parts:
                        continue
                    if len(parts) != 5:
                        raise ValueError(f"{txt}:{lineno}: expected 'class cx cy w h', got {line.strip()!r}")
                    try:
                        c = int(parts[0])
                        cx, cy, w, h = (float(v) for v in parts[1:])
                    except ValueError as e:
                        raise ValueError(f"{txt}:{lineno}: not numbers: {line.strip()!r}") from e
                    if size is None:
                        raise ValueError(f"{path}: cannot read the image size needed to convert YOLO boxes")
                    H, W = size
                    boxes.append([(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H])
                    classes.append(c)
                    labels.append(class_names[c] if class_names and c < len(class_names) else str(c))
        label = int(any((positive_classes is None) or (c in positive_classes) for c in classes))
        out.append(_finish(path, label, boxes, labels, pseudonym(name), size))
    return out


def import_brixia(
    manifest_csv: str, root: str, rater: str = "S", mask_column: str = "v7_lung_mask", require_mask: bool = True
) -> list[dict]:
    """Brixia zone-score manifest (``../shared/data/covid/manifest.csv``) to items.

    ``zone_scores`` are the rater's zone scores A-F binarised (score > 0 -> 1, as the COVID severity paper does),
    ``zone_scores_raw`` the 0-3 scores, ``label`` the binarised global score (0-6); ``lung_mask`` the mask path;
    ``zone_scores_other`` the other rater's binarised zones (S <-> J) where the manifest has them, for the
    rater-agreement figures printed beside the model's.
    """
    cols = [f"{rater}_{z}" for z in BRIXIA_ZONES]
    out = []
    with open(manifest_csv, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in cols if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{manifest_csv}: missing columns {missing} for rater {rater!r}")
        for lineno, row in enumerate(reader, start=2):
            try:
                raw = [int(row[c]) for c in cols]
            except ValueError as e:
                raise ValueError(f"{manifest_csv}:{lineno}: zone scores {[row[c] for c in cols]} are not integers") from e
            if any(s < 0 or s > 3 for s in raw):
                raise ValueError(f"{manifest_csv}:{lineno}: zone scores must be 0-3, got {raw}")
            mask = row.get(mask_column) or ""
            if require_mask and not mask:
                continue
            binarised = [int(s > 0) for s in raw]
            extra = {"zone_scores": binarised, "zone_scores_raw": raw}
            other = "J" if rater == "S" else "S"
            if all(f"{other}_{z}" in row and row[f"{other}_{z}"] != "" for z in BRIXIA_ZONES):
                extra["zone_scores_other"] = [int(int(row[f"{other}_{z}"]) > 0) for z in BRIXIA_ZONES]  # rater comparison
            if mask:
                extra["lung_mask"] = os.path.abspath(os.path.join(root, mask))
            group = pseudonym(row.get("cohen_patientid") or row["filename"])
            out.append(_finish(os.path.join(root, "images", row["filename"]), sum(binarised), [], [], group, **extra))
    return out


def import_lung_masks(manifest_csv: str, root: str | None = None, image_column: str = "filename", mask_column: str = "mask",
                      patient_column: str = "patientid", image_dir: str = "images") -> list[dict]:
    """Images with lung masks for the lung-segmentation stage (``../shared/data/covid/lungseg_extra/manifest.csv``:
    ``filename`` in ``images/``, ``mask`` relative to the manifest's folder, ``patientid``). Items carry ``image``,
    ``lung_mask`` and a pseudonymous patient ``group``; ``label`` is 0 (unused). A row whose image or mask file is
    missing is an error naming the line."""
    root = root or os.path.dirname(os.path.abspath(manifest_csv))
    out = []
    with open(manifest_csv, newline="") as f:
        reader = csv.DictReader(f)
        for lineno, row in enumerate(reader, start=2):
            try:
                image = os.path.join(root, image_dir, row[image_column])
                mask = os.path.join(root, row[mask_column])
            except KeyError as e:
                raise ValueError(f"{manifest_csv}:{lineno}: missing column {e}") from e
            for what, p in (("image", image), ("mask", mask)):
                if not os.path.exists(p):
                    raise FileNotFoundError(f"{manifest_csv}:{lineno}: {what} file {p} not found")
            out.append(_finish(os.path.abspath(image), 0, [], [], pseudonym(row.get(patient_column) or row[image_column]),
                               lung_mask=os.path.abspath(mask)))
    return out
