"""Ingest of a PACS export: a folder tree of DICOM files to a datalist plus a quarantine report.

Every file ends up in exactly one place: the datalist (a usable image), the presentation states that supplied
boxes, or the report with its reason. One bad file never stops the batch. Images are validated by decoding them
with :func:`cutremain_monai.io.dicom.read_xray_dicom`; boxes (from a CSV / datalist file or from GSPS objects)
are validated against the image size, and clipped or dropped boxes are reported too.

No patient identifier is written:

* the datalist's ``group`` is a keyed pseudonym of the patient id (HMAC with the site's secret key,
  :mod:`cutremain_monai.io.pseudonyms`; of the study when there is no patient id);
* files are named relative to the export root (the datalist's ``root``) or, when those paths carry the
  patient's name, ID or birth date (``path_mode="auto"``, the default) or when asked (``"uid"``), by SOP
  Instance UID through a link folder (:mod:`cutremain_monai.io.paths`); the report, the logs and the journal use
  the same names.

At scale (what a plain loop over files lacks):

* **streaming**: files are walked lazily and each is decoded, checked and dropped; only a small record per
  file (its name, UID, group, size) is kept, so peak memory does not grow with the pixels of the batch;
* **workers**: ``workers=N`` decodes in ``N`` processes (results come back in walk order, so the datalist does
  not depend on ``N``);
* **resume**: every record is appended (and flushed) to ``<datalist stem>.ingest-journal.jsonl`` as soon as the
  file is done; ``resume=True`` after a crash or a kill reads it back and decodes only the files not in it, and
  the end result equals an uninterrupted run's. The journal is removed once the datalist and the report are
  written. It is keyed by a token of each relative path and holds only what the outputs hold.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from cutremain_monai.io.boxes import validate_boxes
from cutremain_monai.io.datalist import save_datalist, split_by_group
from cutremain_monai.io.dicom import DicomReadError, check_xray_image, read_dataset, read_xray_dicom
from cutremain_monai.io.gsps import gsps_referenced_sop_uids, is_gsps, read_gsps_file
from cutremain_monai.io.importers import import_csv
from cutremain_monai.io.paths import (
    QUARANTINED,
    LinkFolder,
    file_token,
    header_identifiers,
    path_carries_identifiers,
    resolve_path_mode,
    valid_uid,
)
from cutremain_monai.io.pseudonyms import keyed_pseudonym, site_key

__all__ = ["IngestReport", "ingest", "journal_path", "link_folder_path"]

logger = logging.getLogger(__name__)

JOURNAL_VERSION = 1


@dataclass
class IngestReport:
    """What an ingest did; ``quarantined`` / ``box_warnings`` hold (name as written, reason)."""

    images: int = 0
    presentation_states: int = 0
    quarantined: list = field(default_factory=list)  # (file, reason)
    box_warnings: list = field(default_factory=list)  # (file, message)
    files_seen: int = 0
    decoded: int = 0  # files read in this run (the others came from the journal of an interrupted run)
    resumed: int = 0
    path_mode: str = "relative"
    near_duplicates: dict = field(default_factory=dict)  # summary of the near-duplicate grouping, when asked for

    def summary(self) -> str:
        lines = [
            f"files seen: {self.files_seen}" + (f" ({self.resumed} from the journal, {self.decoded} read now)"
                                                if self.resumed else ""),
            f"images in datalist: {self.images}",
            f"presentation states used: {self.presentation_states}",
            f"quarantined: {len(self.quarantined)}",
            f"box warnings: {len(self.box_warnings)}",
            f"files named: {'by SOP Instance UID (link folder)' if self.path_mode == 'uid' else 'relative to the root'}",
        ]
        if self.near_duplicates:
            n = self.near_duplicates
            lines.append(f"near-duplicate pairs: {n['near_duplicate_pairs']} (|r| >= {n['near_duplicate_threshold']}), "
                         f"groups {n['groups']}, pairs in {n['near_duplicate_report']}")
        reasons: dict[str, int] = {}
        for _, r in self.quarantined:
            key = re.sub(r"\d+", "N", r.split(" (")[0])  # "PixelData has 899 of 2048 bytes" -> one line for all
            reasons[key] = reasons.get(key, 0) + 1
        lines += [f"  {n:5d} x {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])]
        return "\n".join(lines)


def journal_path(output: str) -> str:
    return os.path.splitext(os.fspath(output))[0] + ".ingest-journal.jsonl"


def link_folder_path(output: str) -> str:
    """The link folder of ``path_mode="uid"``: ``<datalist stem>_files`` beside the datalist."""
    return os.path.splitext(os.fspath(output))[0] + "_files"


def _walk(root: str) -> Iterator[tuple[str, str]]:
    """(relative posix path, path) of every file under ``root``, in sorted order, lazily."""
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            yield os.path.relpath(p, root).replace(os.sep, "/"), p


def _paths_carry_identifiers(root: str) -> bool:
    """Header-only scan (no pixel data read): does any file's relative path hold its own patient's name, ID or
    birth date? Stops at the first that does."""
    from cutremain_monai.io.dicom import dcmread_unnamed

    for rel, path in _walk(root):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = dcmread_unnamed(path, stop_before_pixels=True, specific_tags=[
                    0x00100010, 0x00100020, 0x00100030, 0x00101000, 0x00101001, 0x00101060])
            except Exception:
                continue
        if path_carries_identifiers(rel, header_identifiers(ds)):
            return True
    return False


def _scrub(text: str, path: str, name: str) -> str:
    """An error message with the file's path replaced by the name we write (messages often quote the path)."""
    for p in {path, os.path.abspath(path)}:
        text = text.replace(p, name)
    return text


def _examine(args: tuple[str, str, bytes]) -> dict:
    """Read one file (in a worker process): a small record, never the pixels."""
    rel, path, key = args
    token = file_token(rel, key)
    try:
        ds = read_dataset(path)
        if is_gsps(ds):
            return {"k": token, "t": "gsps"}
        check_xray_image(ds, path)
        _, meta = read_xray_dicom(path, dataset=ds)
        pid = str(ds.get("PatientID", "") or "") or str(ds.get("StudyInstanceUID", "") or token)  # (a corrupt
        # PatientID element fails here, inside the try)
        group = keyed_pseudonym(pid, key)
    except DicomReadError as e:
        return {"k": token, "t": "bad", "reason": _scrub(e.reason, path, rel)}
    except Exception as e:  # a batch never dies for one file: anything else is reported with its type
        return {"k": token, "t": "bad", "reason": _scrub(f"unexpected error ({type(e).__name__}: {e})", path, rel)}
    return {"k": token, "t": "image", "uid": str(meta["sop_instance_uid"]), "group": group,
            "size": [int(meta["rows"]), int(meta["columns"])]}


def _pool(workers: int):
    # forkserver (spawn where there is none): a fork of a process that has run torch may inherit its thread pools
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return ctx.Pool(workers)


def _read_journal(path: str, header: dict) -> dict[str, dict]:
    """Records of an interrupted run, keyed by path token; a torn last line (the kill came mid-write) is dropped,
    its file is read again."""
    done: dict[str, dict] = {}
    with open(path) as f:
        first = f.readline()
        try:
            found = json.loads(first)
        except json.JSONDecodeError:
            found = {}
        if found != header:
            differs = sorted(k for k in set(found) | set(header) if found.get(k) != header.get(k))
            raise ValueError(f"{path}: the journal was written by an ingest with other settings ({', '.join(differs)}); "
                             "run without --resume to start again")
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "k" in rec:
                done[rec["k"]] = rec
    return done


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
    path_mode: str = "auto",
    workers: int = 1,
    resume: bool = False,
) -> IngestReport:
    """Walk ``root``, write the datalist to ``output`` and the quarantine report (CSV) beside it.

    Args:
        boxes: a plain CSV (``path,label,x0,y0,x1,y1,box_label``, paths relative to the CSV) or a datalist JSON.
        gsps: read boxes from Grayscale Softcopy Presentation States found in the tree.
        split: (train, val, test) fractions for a patient-wise split; default: everything under ``training``.
        quarantine_dir: copy quarantined files there (the originals are never moved or deleted), under the names
            the report gives them.
        near_duplicates: with ``split``, merge the patient groups of images whose thumbnails correlate at
            ``|r| >=`` this (the same radiograph exported twice under different PatientIDs); see
            :mod:`cutremain_monai.data.near_duplicates`.
        path_mode: ``auto`` | ``relative`` | ``uid`` (:mod:`cutremain_monai.io.paths`).
        workers: processes that decode files (1: in this process).
        resume: continue the interrupted ingest whose journal is beside ``output`` (same root and options).
    """
    from tqdm import tqdm

    if boxes and gsps:
        raise ValueError("give either boxes=FILE or gsps=True, not both")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    resolve_path_mode(path_mode, False)  # a bad mode fails before any file is read
    report = IngestReport()
    key = site_key()  # read (or made) once: a bad key stops before any file is touched
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"export root is not a folder: {root}")
    external = _external_boxes(boxes) if boxes else {}
    jpath = journal_path(output)
    options = {"version": JOURNAL_VERSION, "root": keyed_pseudonym("root:" + root, key)}
    done: dict[str, dict] = {}
    if resume and os.path.exists(jpath):
        with open(jpath) as f:
            try:
                mode = json.loads(f.readline()).get("path_mode")
            except (json.JSONDecodeError, AttributeError):
                mode = None
        if path_mode != "auto" and mode != path_mode:
            raise ValueError(f"{jpath}: the interrupted ingest named files with path mode {mode!r}, not {path_mode!r}")
        header = {**options, "path_mode": mode}
        done = _read_journal(jpath, header)
        journal = open(jpath, "a")
    else:
        if resume:
            logger.warning("no journal at %s: nothing to resume, starting from the beginning", jpath)
        mode = resolve_path_mode(path_mode, path_mode == "auto" and _paths_carry_identifiers(root))
        header = {**options, "path_mode": mode}
        os.makedirs(os.path.dirname(os.path.abspath(jpath)), exist_ok=True)
        journal = open(jpath, "w")
        journal.write(json.dumps(header) + "\n")
        journal.flush()
    report.path_mode = mode
    report.resumed = len(done)
    links = LinkFolder(link_folder_path(output)) if mode == "uid" else None

    skip = frozenset(done)  # (the pool's feeder thread walks while this thread records)

    def pending() -> Iterator[tuple[str, str, bytes]]:
        for rel, path in _walk(root):
            if file_token(rel, key) not in skip:
                yield rel, path, key

    pool = _pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_examine, pending(), chunksize=8) if pool else map(_examine, pending())
        for rec in tqdm(results, desc="ingest", unit="file", disable=not progress):
            journal.write(json.dumps(rec) + "\n")
            journal.flush()  # on disk (the OS's) as soon as the file is done: a SIGKILL loses nothing finished
            done[rec["k"]] = rec
            report.decoded += 1
    finally:
        if pool is not None:
            pool.terminate()
        journal.close()

    def image_name(rec: dict, rel: str) -> str:
        if mode == "relative":
            return rel
        uid = rec["uid"]
        return f"{uid}.dcm" if valid_uid(uid) else f"{rec['k']}.dcm"

    def bad_name(rel: str) -> str:
        return rel if mode == "relative" else f"{QUARANTINED}/{file_token(rel, key)}"

    # assembly: one more walk (names only), in the same order whatever the workers and the interruptions were
    images: dict[str, dict] = {}  # sop uid -> item (image = the name written)
    sizes: dict[str, tuple[int, int]] = {}
    where: dict[str, str] = {}  # name -> path on disk (for the GSPS pass, near-duplicates and quarantine copies)
    states: list[tuple[str, str]] = []
    quarantined_paths: list[str] = []

    def quarantine(rel: str, path: str, reason: str) -> None:
        name = bad_name(rel)
        report.quarantined.append((name, reason))
        quarantined_paths.append(path)
        if links is not None:
            links.link(path, name)

    for rel, path in _walk(root):
        report.files_seen += 1
        rec = done[file_token(rel, key)]
        if rec["t"] == "bad":
            quarantine(rel, path, rec["reason"])
            continue
        if rec["t"] == "gsps":
            states.append((rel, path))
            continue
        uid = rec["uid"]
        if uid in images:
            quarantine(rel, path, f"duplicate SOPInstanceUID of {images[uid]['image']}")
            continue
        name = image_name(rec, rel)
        if links is not None:
            links.link(path, name)
        item = {"image": name, "label": 0, "boxes": [], "box_labels": [], "group": rec["group"]}
        ext = external.pop(os.path.abspath(path), None)
        if ext is not None:
            item["label"] = ext["label"]
            item["boxes"], item["box_labels"] = ext["boxes"], ext["box_labels"]
        images[uid] = item
        sizes[uid] = tuple(rec["size"])
        where[name] = path
    for p in sorted(external):  # what is left of the boxes file named no usable image
        inside = not os.path.relpath(p, root).startswith("..")
        shown = (os.path.relpath(p, root).replace(os.sep, "/") if mode == "relative" else
                 file_token(os.path.relpath(p, root) if inside else p, key))
        report.box_warnings.append((shown, "listed in the boxes file but not a usable image in the batch"))
    for rel, path in states:
        try:
            ds = read_dataset(path)
            refs = [u for u in gsps_referenced_sop_uids(ds) if u in images]
        except DicomReadError as e:
            quarantine(rel, path, _scrub(e.reason, path, bad_name(rel)))
            continue
        except Exception as e:  # a corrupt reference sequence is reported, never ends the batch
            quarantine(rel, path, f"presentation state unreadable ({type(e).__name__})")
            continue
        if not refs:
            quarantine(rel, path, "presentation state references no usable image in the batch")
            continue
        if not gsps:
            quarantine(rel, path, "presentation state ignored (run with --gsps to read its boxes)")
            continue
        report.presentation_states += 1
        try:
            found_boxes = read_gsps_file(path, sizes, dataset=ds)
        except DicomReadError as e:  # a corrupt presentation state is reported, never ends the batch
            quarantine(rel, path, _scrub(e.reason, path, bad_name(rel)))
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

        on_disk = [{**it, "image": where[it["image"]] if links is None else os.path.join(links.folder, it["image"])}
                   for it in items]
        merged, near, _ = group_near_duplicates_for_split(on_disk, near_duplicates, output)  # all readable here
        items = [{**it, "group": m["group"]} for it, m in zip(items, merged)]
        report.near_duplicates = near
    datalist = split_by_group(items, split, seed) if split else {"training": items, "validation": [], "test": []}
    out_dir = os.path.dirname(os.path.abspath(output))
    datalist["root"] = root if links is None else os.path.relpath(links.folder, out_dir)
    datalist["ingest"] = {"files_seen": report.files_seen, "quarantined": len(report.quarantined),
                          "path_mode": mode, **near}
    save_datalist(datalist, output)
    report_path = report_path or os.path.splitext(output)[0] + "_quarantine.csv"
    tmp = report_path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "status", "reason"])
        for p, r in report.quarantined:
            w.writerow([p, "quarantined", r])
        for p, r in report.box_warnings:
            w.writerow([p, "box warning", r])
    os.replace(tmp, report_path)
    if quarantine_dir:
        os.makedirs(quarantine_dir, exist_ok=True)
        for (name, _), p in zip(report.quarantined, quarantined_paths):
            shutil.copy2(p, os.path.join(quarantine_dir, name.replace("/", "__")))
    for p, r in report.quarantined:
        logger.warning("quarantined %s: %s", p, r)
    os.unlink(jpath)  # done: a later --resume starts afresh
    return report
