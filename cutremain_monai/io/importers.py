"""Importers from common annotation formats to the datalist items of :mod:`cutremain_monai.io.datalist`.

Each returns a list of items (``image`` absolute path, ``label``, ``boxes`` xyxy pixels of the stored image,
``box_labels``, ``group``). Patient identifiers never enter an item: ``group`` is a salted SHA-256 of the source's
patient id, which keeps patient-wise splits possible without writing the id. A malformed row is a ``ValueError``
naming the file and the line; boxes are validated against the image size when it is known
(:func:`cutremain_monai.io.boxes.validate_boxes`: clipped or dropped with a warning naming the file).

Every image (and lung mask) an importer references is decoded once, completely, with the training loader
(:func:`cutremain_monai.io.decode.decode_image`), which also gives the image size the boxes are checked against. A
file that does not decode (FracAtlas' truncated ``IMG0004098.jpg``, a cut download, a mask that is not 2-D) is
left out of the items and listed, with the decoder's reason, in the returned list's ``quarantined`` attribute
(an :class:`ImportedItems`), and logged; ``cutremain import`` writes these to ``<datalist>_quarantine.csv``
(:func:`write_quarantine`, the file name and columns of ``cutremain ingest``'s report). ``check_images=False``
(``check_sizes=False`` for :func:`import_csv`) skips the decoding: nothing is then left out, and sizes come from
the file headers where an importer needs them.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import os
from collections import OrderedDict

import numpy as np

from cutremain_monai.constants import BRIXIA_ZONES, CXR14_LABELS
from cutremain_monai.io.boxes import validate_boxes, xywh_to_xyxy
from cutremain_monai.io.dicom import dcmread_unnamed
from cutremain_monai.io.decode import decode_image

__all__ = [
    "ImportedItems",
    "image_size",
    "quarantine_path",
    "write_quarantine",
    "pseudonym",
    "import_csv",
    "import_nih_cxr14",
    "import_coco",
    "import_fracatlas_manifest",
    "import_yolo",
    "import_brixia",
    "import_lung_masks",
]

logger = logging.getLogger(__name__)

_SALT = "cutremain_monai-group-v1"
QUARANTINE_FIELDS = ("file", "status", "reason")


class ImportedItems(list):
    """The items of an import (a plain ``list`` of dicts) plus ``quarantined``: ``[(file, reason), ...]``, the
    images or masks left out because they do not decode."""
    def __init__(self, items=(), quarantined=()):
        super().__init__(items)
        self.quarantined = list(quarantined)


def quarantine_path(datalist_path: str) -> str:
    """``<datalist stem>_quarantine.csv`` beside the datalist, the report name ``cutremain ingest`` uses."""
    return os.path.splitext(datalist_path)[0] + "_quarantine.csv"


def write_quarantine(path: str, quarantined) -> str:
    """Write ``[(file, reason), ...]`` as a quarantine report (columns ``file,status,reason`` as ``cutremain
    ingest``'s, status ``quarantined``); written even when empty, so a report always says what was left out."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(QUARANTINE_FIELDS)
        for file, reason in quarantined:
            w.writerow([file, "quarantined", reason])
    return path


def _decode(path: str) -> tuple[tuple[int, int] | None, str | None]:
    """``((H, W), None)`` when ``path`` decodes completely (as training reads it), else ``(None, reason)``."""
    try:
        return decode_image(path), None
    except Exception as e:  # any decoder error sets this one file aside, with its type and message
        return None, f"{type(e).__name__}: {e}"


def _checked_size(path: str, check_images: bool, quarantined: list, header: bool = True) -> tuple[bool, tuple[int, int] | None]:
    """``(True, size)``: the decoded size with ``check_images`` (a file that does not decode is added to
    ``quarantined`` with its reason and gives ``(False, None)``), else the size from the header (``None`` when
    ``header`` is false)."""
    if not check_images:
        return True, (image_size(path) if header else None)
    size, reason = _decode(path)
    if reason:
        quarantined.append((os.path.abspath(path), reason))
        return False, None
    return True, size


def _done(source: str, items: list[dict], quarantined: list[tuple[str, str]]) -> ImportedItems:
    for file, reason in quarantined:
        logger.warning("%s: left out %s: %s", source, file, reason)
    if quarantined:
        logger.warning("%s: %d file(s) left out because they do not decode (%d items kept)", source,
                       len(quarantined), len(items))
    return ImportedItems(items, quarantined)


def pseudonym(patient_id) -> str:
    """A stable, non-reversible group key for a patient id (never the id itself)."""
    return hashlib.sha256(f"{_SALT}:{patient_id}".encode()).hexdigest()[:12]


def image_size(path: str) -> tuple[int, int] | None:
    """(H, W) from the file header (PIL for raster images, pydicom for DICOM); None when unreadable."""
    try:
        if path.lower().endswith((".dcm", ".dicom")):
            ds = dcmread_unnamed(path, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        from PIL import Image

        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # only used when decoding is switched off: the image is validated later, by its reader
        return None


def _finish(image: str, label, boxes, box_labels, group, size=None, **extra) -> dict:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if size is not None and len(boxes):
        boxes, labs, _ = validate_boxes(boxes, size, np.arange(len(boxes)), source=image)
        box_labels = [box_labels[int(i)] for i in labs]
    item = {"image": os.path.abspath(image), "label": label, "boxes": boxes.round(2).tolist(), "box_labels": list(box_labels), "group": group}
    item.update(extra)
    return item


def import_csv(path: str, image_root: str | None = None, check_sizes: bool = True) -> ImportedItems:
    """Plain CSV, one row per box: ``path,label,x0,y0,x1,y1,box_label`` (header optional).

    A row with empty box fields lists an image without boxes. Rows of the same path are merged (its label must
    agree). Integer labels stay ints; ``a|b`` style labels are not interpreted. ``check_sizes``: decode every
    image (undecodable ones go to ``quarantined``) and check the boxes against its size; ``False`` takes the
    rows as they are (``cutremain ingest`` reads a boxes CSV so, and validates the images itself).
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
    out, quarantined = [], []
    for img, it in items.items():
        ok, size = _checked_size(img, check_sizes, quarantined, header=False)
        if not ok:
            continue
        out.append(_finish(img, it["label"], it["boxes"], it["box_labels"], pseudonym(img), size))
    return _done(path, out, quarantined)


def import_nih_cxr14(
    data_entry_csv: str, image_dir: str, bbox_csv: str | None = None, only_present: bool = True,
    check_images: bool = True,
) -> ImportedItems:
    """NIH ChestX-ray14: ``Data_Entry_2017*.csv`` (+ ``BBox_List_2017.csv[.gz]``) to 14-label items.

    ``label`` is the 14-vector in :data:`cutremain_monai.constants.CXR14_LABELS` order ("No Finding" = all zero);
    boxes (xywh in the 1024 px images) become xyxy with the finding name as box label ("Infiltrate" is mapped to
    "Infiltration"). ``only_present`` keeps rows whose image file exists in ``image_dir`` (the subsets hold a
    few of the 112,120 images); of those, images that do not decode go to ``quarantined`` (``check_images``).
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
    out, quarantined = [], []
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
            if check_images:
                _, reason = _decode(path)
                if reason:
                    quarantined.append((os.path.abspath(path), reason))
                    continue
            bl = boxes.get(name, [])
            size = (1024, 1024)  # boxes are in the distributed 1024 px frame, not the original scan size
            out.append(_finish(path, label, [b for b, _ in bl], [n for _, n in bl], pseudonym(pid), size))
    return _done(data_entry_csv, out, quarantined)


def import_coco(coco_json: str, image_dir: str, positive_categories: list[str] | None = None,
                check_images: bool = True) -> ImportedItems:
    """COCO detection JSON (e.g. FracAtlas): one item per image; ``label`` 1 if it has a box of a positive category.

    ``positive_categories`` defaults to all categories. Boxes are COCO ``[x, y, w, h]`` in the stored image, checked
    against the JSON's ``width`` / ``height`` (else the decoded size). Images that do not decode go to
    ``quarantined`` (``check_images``).
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
    out, quarantined = [], []
    for img in coco.get("images", []):
        path = os.path.join(image_dir, img["file_name"])
        ok, decoded = _checked_size(path, check_images, quarantined, header=False)
        if not ok:
            continue
        a = anns.get(img["id"], [])
        names = [cats[x["category_id"]] for x in a]
        boxes = xywh_to_xyxy([x["bbox"] for x in a]) if a else np.zeros((0, 4))
        size = (img["height"], img["width"]) if "height" in img and "width" in img else decoded
        label = int(any(n in positive for n in names))
        out.append(_finish(path, label, boxes, names, pseudonym(img["file_name"]), size))
    return _done(coco_json, out, quarantined)


def import_fracatlas_manifest(manifest_csv: str, image_dir: str, region: str | None = None,
                               check_images: bool = True, block_size: int | None = None) -> ImportedItems:
    """The FracAtlas manifest in ``../shared/data/fracture`` (``fractured``, ``fracture_bboxes_xywh``, ``region``).

    ``region`` keeps rows whose ``|``-joined region flags contain it (``"hip"``, ``"shoulder"``). Images that do
    not decode (FracAtlas ships a truncated ``IMG0004098.jpg``) go to ``quarantined`` (``check_images``).
    ``block_size``: FracAtlas has no patient ids and neighbouring image numbers are often one patient, so the split
    group of ``IMG0001234.jpg`` becomes its block of consecutive numbers (``1234 // block_size``; 25 suits it);
    ``None`` keeps one group per image.
    """
    out, quarantined = [], []
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
            ok, size = _checked_size(path, check_images, quarantined)
            if not ok:
                continue
            xyxy = xywh_to_xyxy(boxes) if boxes else np.zeros((0, 4))
            key = row["image_id"]
            if block_size:
                digits = "".join(ch for ch in os.path.splitext(key)[0] if ch.isdigit())
                if not digits:
                    raise ValueError(f"{manifest_csv}:{lineno}: image_id {key!r} has no image number for block_size")
                key = f"block{int(digits) // int(block_size)}"
            out.append(_finish(path, label, xyxy, ["fracture"] * len(xyxy), pseudonym(key), size))
    return _done(manifest_csv, out, quarantined)


def import_yolo(
    image_dir: str, label_dir: str, class_names: list[str] | None = None, positive_classes: list[int] | None = None,
    check_images: bool = True,
) -> ImportedItems:
    """YOLO txt (``class cx cy w h`` normalised to 0-1), one file per image with the same stem.

    Pixel boxes need the image size, taken from the decoded image (from its header with ``check_images=False``);
    images that do not decode go to ``quarantined``. ``label`` is 1 if the image has a box of a positive class
    (default: any class).
    """
    exts = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm")
    out, quarantined = [], []
    for name in sorted(os.listdir(image_dir)):
        if not name.lower().endswith(exts):
            continue
        path = os.path.join(image_dir, name)
        txt = os.path.join(label_dir, os.path.splitext(name)[0] + ".txt")
        ok, size = _checked_size(path, check_images, quarantined)
        if not ok:
            continue
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
    return _done(image_dir, out, quarantined)


def import_brixia(
    manifest_csv: str, root: str, rater: str = "S", mask_column: str = "v7_lung_mask", require_mask: bool = True,
    check_images: bool = True,
) -> ImportedItems:
    """Brixia zone-score manifest (``../shared/data/covid/manifest.csv``) to items.

    ``zone_scores`` are the rater's zone scores A-F binarised (score > 0 -> 1, as the COVID severity paper does),
    ``zone_scores_raw`` the 0-3 scores, ``label`` the binarised global score (0-6); ``lung_mask`` the mask path;
    ``zone_scores_other`` the other rater's binarised zones (S <-> J) where the manifest has them, for the
    rater-agreement figures printed beside the model's. A row whose image or lung mask does not decode goes to
    ``quarantined`` (``check_images``).
    """
    cols = [f"{rater}_{z}" for z in BRIXIA_ZONES]
    out, quarantined = [], []
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
            image = os.path.join(root, "images", row["filename"])
            if check_images:
                bad = _first_undecodable(image, extra.get("lung_mask"))
                if bad:
                    quarantined.append(bad)
                    continue
            group = pseudonym(row.get("cohen_patientid") or row["filename"])
            out.append(_finish(image, sum(binarised), [], [], group, **extra))
    return _done(manifest_csv, out, quarantined)


def _first_undecodable(image: str, mask: str | None) -> tuple[str, str] | None:
    """``(file, reason)`` for the image, else its lung mask, when it does not decode; None when both do."""
    _, reason = _decode(image)
    if reason:
        return os.path.abspath(image), reason
    if mask:
        _, reason = _decode(mask)
        if reason:
            return os.path.abspath(mask), f"lung mask of {os.path.abspath(image)}: {reason}"
    return None


def import_lung_masks(manifest_csv: str, root: str | None = None, image_column: str = "filename", mask_column: str = "mask",
                      patient_column: str = "patientid", image_dir: str = "images",
                      check_images: bool = True) -> ImportedItems:
    """Images with lung masks for the lung-segmentation stage (``../shared/data/covid/lungseg_extra/manifest.csv``:
    ``filename`` in ``images/``, ``mask`` relative to the manifest's folder, ``patientid``). Items carry ``image``,
    ``lung_mask`` and a pseudonymous patient ``group``; ``label`` is 0 (unused). A row whose image or mask file is
    missing is an error naming the line; one whose image or mask exists but does not decode (masks may be PNG or
    NIfTI / MHA / NRRD, see :mod:`cutremain_monai.io.loader`) goes to ``quarantined`` (``check_images``)."""
    root = root or os.path.dirname(os.path.abspath(manifest_csv))
    out, quarantined = [], []
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
            if check_images:
                bad = _first_undecodable(image, mask)
                if bad:
                    quarantined.append(bad)
                    continue
            out.append(_finish(os.path.abspath(image), 0, [], [], pseudonym(row.get(patient_column) or row[image_column]),
                               lung_mask=os.path.abspath(mask)))
    return _done(manifest_csv, out, quarantined)
