"""Ingest of a PACS export: a folder tree of DICOM files to a datalist plus a quarantine report.

Every file ends up in exactly one place: the datalist (a usable image), the presentation states that supplied
boxes, or the report with its reason. One bad file never stops the batch. Images are validated by decoding them
with :func:`cutremain_monai.io.dicom.read_xray_dicom`; boxes (from a CSV / datalist file or from GSPS objects)
are validated against the image size, and clipped or dropped boxes are reported too. No patient identifier is
written: the datalist's ``group`` is a keyed pseudonym of the patient id (HMAC with the site's secret key,
:mod:`cutremain_monai.io.pseudonyms`; of the study when there is no patient id).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from cutremain_monai.io.boxes import validate_boxes
from cutremain_monai.io.datalist import save_datalist, split_by_group
from cutremain_monai.io.dicom import DicomReadError, check_xray_image, read_dataset, read_xray_dicom
from cutremain_monai.io.gsps import gsps_referenced_sop_uids, is_gsps, read_gsps_file
from cutremain_monai.io.importers import import_csv
from cutremain_monai.io.pseudonyms import keyed_pseudonym, site_key

__all__ = ["IngestReport", "ingest"]

logger = logging.getLogger(__name__)


@dataclass
class IngestReport:
    images: int = 0
    presentation_states: int = 0
    quarantined: list = field(default_factory=list)  # (file, reason)
    box_warnings: list = field(default_factory=list)  # (file, message)
    files_seen: int = 0
    near_duplicates: dict = field(default_factory=dict)  # summary of the near-duplicate grouping, when asked for

    def summary(self) -> str:
        lines = [
            f"files seen: {self.files_seen}",
            f"images in datalist: {self.images}",
            f"presentation states used: {self.presentation_states}",
            f"quarantined: {len(self.quarantined)}",
            f"box warnings: {len(self.box_warnings)}",
        ]
        if self.near_duplicates:
            n = self.near_duplicates
            lines.append(f"near-duplicate pairs: {n['near_duplicate_pairs']} (|r| >= {n['near_duplicate_threshold']}), "
                         f"groups {n['groups']}, pairs in {n['near_duplicate_report']}")
        reasons: dict[str, int] = {}
        for _, r in self.quarantined:
            key = r.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        lines += [f"  {n:5d} x {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])]
        return "\n".join(lines)


def _walk(root: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        out += [os.path.join(d, f) for f in sorted(files)]
    return out


def _external_boxes(path: str) -> dict[str, dict]:
    """Boxes keyed by absolute image path, from a plain CSV or a datalist JSON."""
    if path.lower().endswith(".json"):
        from cutremain_monai.io.datalist import load_datalist

        with open(path) as f:
            sections = [k for k in json.load(f) if k in ("training", "validation", "test")]
        items = [it for s in sections for it in load_datalist(path, s)]
    else:
        items = import_csv(path, check_sizes=False)
    return {os.path.abspath(it["image"]): it for it in items}


def ingest(
    root: str,
    output: str,
    boxes: str | None = None,
    gsps: bool = False,
    split: tuple[float, float, float] | None = None,
    quarantine_dir: str | None = None,
    report_path: str | None = None,
    progress: bool = True,
    seed: int = 0,
    near_duplicates: float | None = None,
) -> IngestReport:
    """Walk ``root``, write the datalist to ``output`` and the quarantine report (CSV) beside it.

    Args:
        boxes: a plain CSV (``path,label,x0,y0,x1,y1,box_label``, paths relative to the CSV) or a datalist JSON.
        gsps: read boxes from Grayscale Softcopy Presentation States found in the tree.
        split: (train, val, test) fractions for a patient-wise split; default: everything under ``training``.
        quarantine_dir: copy quarantined files there (the originals are never moved or deleted).
        near_duplicates: with ``split``, merge the patient groups of images whose thumbnails correlate at
            ``|r| >=`` this (the same radiograph exported twice under different PatientIDs); see
            :mod:`cutremain_monai.data.near_duplicates`.
    """
    from tqdm import tqdm

    if boxes and gsps:
        raise ValueError("give either boxes=FILE or gsps=True, not both")
    report = IngestReport()
    key = site_key()  # read (or made) once: a bad key stops before any file is touched
    external = _external_boxes(boxes) if boxes else {}
    files = _walk(root)
    report.files_seen = len(files)
    images: dict[str, dict] = {}  # sop uid -> item
    sizes: dict[str, tuple[int, int]] = {}
    states = []
    for path in tqdm(files, desc="ingest", unit="file", disable=not progress):
        try:
            ds = read_dataset(path)
            if is_gsps(ds):
                states.append((path, ds))
                continue
            check_xray_image(ds, path)
            img, meta = read_xray_dicom(path, dataset=ds)
            pid = str(ds.get("PatientID", "") or "") or str(ds.get("StudyInstanceUID", "") or path)  # (a corrupt
            # PatientID element fails here, inside the try)
        except DicomReadError as e:
            report.quarantined.append((path, e.reason))
            continue
        except Exception as e:  # a batch never dies for one file: anything else is reported with its type
            report.quarantined.append((path, f"unexpected error ({type(e).__name__}: {e})"))
            continue
        uid = meta["sop_instance_uid"]
        if uid in images:
            report.quarantined.append((path, f"duplicate SOPInstanceUID of {images[uid]['image']}"))
            continue
        item = {"image": os.path.abspath(path), "label": 0, "boxes": [], "box_labels": [], "group": keyed_pseudonym(pid, key)}
        ext = external.get(os.path.abspath(path))
        if ext is not None:
            item["label"] = ext["label"]
            item["boxes"], item["box_labels"] = ext["boxes"], ext["box_labels"]
        images[uid] = item
        sizes[uid] = (meta["rows"], meta["columns"])
    if boxes:
        known = {it["image"] for it in images.values()}
        for p in sorted(set(external) - known):
            report.box_warnings.append((p, "listed in the boxes file but not a usable image in the batch"))
    for path, ds in states:
        try:
            refs = [u for u in gsps_referenced_sop_uids(ds) if u in images]
        except Exception as e:  # a corrupt reference sequence is reported, never ends the batch
            report.quarantined.append((path, f"presentation state unreadable ({type(e).__name__})"))
            continue
        if not refs:
            report.quarantined.append((path, "presentation state references no usable image in the batch"))
            continue
        if not gsps:
            report.quarantined.append((path, "presentation state ignored (run with --gsps to read its boxes)"))
            continue
        report.presentation_states += 1
        try:
            found_boxes = read_gsps_file(path, sizes, dataset=ds)
        except DicomReadError as e:  # a corrupt presentation state is reported, never ends the batch
            report.quarantined.append((path, e.reason))
            continue
        for uid, found in found_boxes.items():
            if uid in images:
                images[uid]["boxes"] += [b.tolist() for b, _ in found]
                images[uid]["box_labels"] += [lab for _, lab in found]
    items = []
    for uid, item in images.items():
        if item["boxes"]:
            kept, labs, msgs = validate_boxes(
                item["boxes"], sizes[uid], np.arange(len(item["boxes"])), source=item["image"], warn=False
            )
            report.box_warnings += [(item["image"], m.split(": ", 1)[1]) for m in msgs]
            item["box_labels"] = [item["box_labels"][int(i)] for i in labs]
            item["boxes"] = kept.round(2).tolist()
            if gsps:
                item["label"] = int(len(item["boxes"]) > 0)
        items.append(item)
    report.images = len(items)
    near = {}
    if split and near_duplicates:
        from cutremain_monai.data.near_duplicates import group_near_duplicates_for_split

        items, near, _ = group_near_duplicates_for_split(items, near_duplicates, output)  # all readable here
        report.near_duplicates = near
    datalist = split_by_group(items, split, seed) if split else {"training": items, "validation": [], "test": []}
    datalist["ingest"] = {"root": os.path.abspath(root), "files_seen": report.files_seen,
                          "quarantined": len(report.quarantined), **near}
    save_datalist(datalist, output)
    report_path = report_path or os.path.splitext(output)[0] + "_quarantine.csv"
    with open(report_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "status", "reason"])
        for p, r in report.quarantined:
            w.writerow([p, "quarantined", r])
        for p, r in report.box_warnings:
            w.writerow([p, "box warning", r])
    if quarantine_dir:
        os.makedirs(quarantine_dir, exist_ok=True)
        for p, _ in report.quarantined:
            rel = os.path.relpath(p, root).replace(os.sep, "__")
            shutil.copy2(p, os.path.join(quarantine_dir, rel))
    for p, r in report.quarantined:
        logger.warning("quarantined %s: %s", p, r)
    return report
