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
  not depend on ``N``); a process killed by a decoder (segfault, out of memory) is noticed, the file that did it
  is found by reading the files that were in flight one by one, and reported; the batch goes on;
* **resume**: every record is appended (and flushed) to ``<datalist stem>.ingest-journal.jsonl`` as soon as the
  file is done; ``resume=True`` after a crash or a kill reads it back and decodes only the files not in it, and
  the end result equals an uninterrupted run's (a file changed since, by size or time, is read again). The
  journal is removed once the datalist and the report are written. It is keyed by a token of each relative path
  and holds no path and no identifier (error reasons are stripped of the path).
* outputs put inside the export (datalist, report, journal, link folder, quarantine copies) are not ingested.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from cutremain_monai.io.boxes import validate_boxes
from cutremain_monai.io.datalist import load_datalist, save_datalist, split_by_group
from cutremain_monai.io.dicom import DicomReadError, check_xray_image, read_dataset, read_xray_dicom
from cutremain_monai.io.gsps import gsps_referenced_sop_uids, is_gsps, read_gsps_file
from cutremain_monai.io.importers import import_csv
from cutremain_monai.io.near_duplicates import group_near_duplicates_for_split
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
from cutremain_monai.io.sr import is_model_output, is_sr, read_sr_file, sr_referenced_sop_uids

__all__ = ["IngestReport", "ingest", "journal_path", "link_folder_path"]

logger = logging.getLogger(__name__)

JOURNAL_VERSION = 1


@dataclass
class IngestReport:
    """What an ingest did; ``quarantined`` / ``box_warnings`` hold (name as written, reason)."""
    images: int = 0
    presentation_states: int = 0
    structured_reports: int = 0
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
            f"structured reports used: {self.structured_reports}",
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


def _walk(root: str, skip_prefixes: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
    """(relative posix path, path) of every file under ``root``, in sorted order, lazily; files and folders under
    ``skip_prefixes`` (our own outputs, when they were put inside the export) are left out."""
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not os.path.join(d, x).startswith(skip_prefixes))
        folder = os.path.relpath(d, root).replace(os.sep, "/")  # once per folder: relpath costs 40 us a call
        for f in sorted(files):
            p = os.path.join(d, f)
            if not p.startswith(skip_prefixes):
                yield (f if folder == "." else f"{folder}/{f}"), p


_PLACEHOLDER = "<file>"


def _scrub(text: str, path: str) -> str:
    """An error message without the file's path (messages of open(), pydicom and decoders quote it, sometimes in
    its repr): the report names the file itself, by a name that carries no identifier."""
    for p in sorted({path, os.path.abspath(path), repr(path)[1:-1], repr(os.path.abspath(path))[1:-1]}, key=len,
                    reverse=True):
        text = text.replace(p, _PLACEHOLDER)
    return text


def _stat(path: str) -> list[int]:
    try:
        st = os.stat(path)
    except OSError:
        return [-1, -1]
    return [int(st.st_size), int(st.st_mtime_ns)]


def _examine(args: tuple[str, str, bytes]) -> dict:
    """Read one file (in a worker process or in this one): a small record, never the pixels.

    Record: ``k`` (token of the relative path), ``t`` (``image`` | ``gsps`` | ``sr`` | ``bad``), ``st`` (size and mtime:
    a changed file is read again on resume), ``c`` (its path holds its own patient's identifiers), and ``uid``,
    ``group``, ``size`` for images or ``reason`` (without the path) for the others.
    """
    rel, path, key = args
    rec: dict = {"k": file_token(rel, key), "t": "bad", "st": _stat(path), "c": False}
    try:
        ds = read_dataset(path)
        try:
            rec["c"] = path_carries_identifiers(os.path.abspath(path), header_identifiers(ds))
        except Exception:  # a corrupt identifier element: nothing to compare
            pass
        if is_gsps(ds) or is_sr(ds):
            rec["t"] = "gsps" if is_gsps(ds) else "sr"
            return rec
        check_xray_image(ds, path)
        _, meta = read_xray_dicom(path, dataset=ds)
        pid = str(ds.get("PatientID", "") or "") or str(ds.get("StudyInstanceUID", "") or rec["k"])  # (a corrupt
        # PatientID element fails here, inside the try)
        rec.update(t="image", uid=str(meta["sop_instance_uid"] or ""), group=keyed_pseudonym(pid, key),
                   size=[int(meta["rows"]), int(meta["columns"])])
    except DicomReadError as e:
        rec["reason"] = _scrub(e.reason, path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a batch never dies for one file: anything else is reported with its type
        rec["reason"] = _scrub(f"unexpected error ({type(e).__name__}: {e})", path)
    return rec


def _context():
    # forkserver (spawn where there is none): a fork of the caller (which may have run torch) may inherit its thread
    # pools. The fork server imports this module once (pydicom and numpy; no torch, no MONAI); each worker is then a
    # fork of it that starts in milliseconds
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _crashed(task: tuple[str, str, bytes], why: str) -> dict:
    rel, path, key = task
    return {"k": file_token(rel, key), "t": "bad", "st": _stat(path), "c": False,
            "reason": f"the reader crashed on this file ({why})"}


CHUNK_SECONDS = 0.05  # work per submission to a worker process (see _in_processes)
MAX_CHUNK = 64


def _examine_each(examine, tasks: list) -> list[dict]:
    """``examine`` over a chunk of tasks, in a worker process."""
    return [examine(t) for t in tasks]


def _in_processes(tasks: Iterator, workers: int, examine) -> Iterator[dict]:
    """``examine`` over ``tasks`` in ``workers`` processes, results in task order, a bounded window in flight.

    Tasks go to the workers in chunks sized to about ``CHUNK_SECONDS`` of work each (one file at a time until the
    first results tell how long a file takes; at most ``MAX_CHUNK``): one submission per file costs the main
    process about as much as a small file costs a worker (pickling, pipes, futures), which made two workers no
    faster than one on small files, while large files (seconds each) go one by one so the last ones are shared.

    A process that dies (a decoder's segfault, the OOM killer) breaks the pool; ``multiprocessing.Pool`` would
    wait for the lost task for ever. Here the tasks that were in flight are run again one at a time in a
    one-process pool, so the one that kills its process again is known: it is reported as crashed, a fresh process
    takes the rest, and the batch goes on.
    """
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    from itertools import islice

    ctx = _context()
    window = 4 * workers  # chunks in flight: every worker has the next one queued while it works
    pool = ProcessPoolExecutor(workers, mp_context=ctx)
    flight: deque = deque()
    tasks = iter(tasks)
    chunk, done, started = 1, 0, None
    try:
        while True:
            while len(flight) < window:
                batch = list(islice(tasks, chunk))
                if not batch:
                    break
                flight.append((batch, pool.submit(_examine_each, examine, batch)))
            if not flight:
                return
            batch, fut = flight[0]
            try:
                recs = fut.result()
            except BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)
                yield from _isolate([t for b, _ in flight for t in b], examine, ctx)
                flight.clear()
                pool = ProcessPoolExecutor(workers, mp_context=ctx)
                continue
            flight.popleft()
            # worker-seconds per file, measured from the first result on (the workers' start is not a file's work)
            if started is None:
                started = time.perf_counter()
            else:
                done += len(recs)
                per_file = (time.perf_counter() - started) * workers / done
                chunk = max(1, min(MAX_CHUNK, int(CHUNK_SECONDS / max(per_file, 1e-6))))
            yield from recs
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _isolate(tasks: list, examine, ctx) -> Iterator[dict]:
    """``tasks`` one at a time in a one-process pool: a task that breaks it is the one that killed its process
    (reported as crashed; a new process takes the next task)."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    single = ProcessPoolExecutor(1, mp_context=ctx)
    try:
        for t in tasks:
            try:
                rec = single.submit(examine, t).result()
            except BrokenProcessPool:
                logger.warning("a reader crashed its process on %s", file_token(t[0], t[2]))
                rec = _crashed(t, "its process died while decoding it")
                single.shutdown(wait=True, cancel_futures=True)
                single = ProcessPoolExecutor(1, mp_context=ctx)
            yield rec
    finally:
        single.shutdown(wait=True, cancel_futures=True)


def _read_journal(path: str, header: dict) -> tuple[dict[str, dict], dict[str, int]] | None:
    """Records of an interrupted run keyed by path token, and how many runs started each unfinished file; None
    when there is no usable journal (missing, or its header torn by a kill right at the start).

    The file is cut after its last complete line, so what is appended next never joins a torn line.
    """
    if not os.path.exists(path):
        return None
    with open(path, "rb+") as f:
        data = f.read()
        cut = data.rfind(b"\n") + 1
        if cut < len(data):
            f.truncate(cut)
    lines = data[:cut].split(b"\n")
    try:
        found = json.loads(lines[0])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if found != header:
        differs = sorted(k for k in set(found) | set(header) if found.get(k) != header.get(k))
        raise ValueError(f"{path}: the journal was written by an ingest with other settings ({', '.join(differs)}); "
                         "run without --resume to start again")
    done: dict[str, dict] = {}
    started: dict[str, int] = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(rec, dict) or "k" not in rec:
            continue
        if rec.get("t") == "started":
            started[rec["k"]] = started.get(rec["k"], 0) + 1
        else:
            done[rec["k"]] = rec
    return done, {k: n for k, n in started.items() if k not in done}


def _external_boxes(path: str) -> dict[str, dict]:
    """Boxes keyed by absolute image path, from a plain CSV or a datalist JSON."""
    if path.lower().endswith(".json"):
        with open(path) as f:
            sections = [k for k in json.load(f) if k in ("training", "validation", "test")]
        items = [it for s in sections for it in load_datalist(path, s)]
    else:
        items = import_csv(path, check_sizes=False)
    return {os.path.abspath(it["image"]): it for it in items}


def _check_arguments(boxes: str | None, gsps: bool, sr: bool, workers: int, path_mode: str) -> None:
    """The argument errors that stop an ingest before any file is read."""
    if boxes and (gsps or sr):
        raise ValueError("give either boxes=FILE or gsps / sr, not both")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    resolve_path_mode(path_mode, False)  # a bad mode fails before any file is read


def _own_outputs(output: str, report_path: str, quarantine_dir: str | None) -> tuple[str, ...]:
    """Path prefixes of our own outputs, which are not part of the export when they sit inside it."""
    return tuple(p for p in (os.path.splitext(output)[0], report_path,
                             os.path.abspath(quarantine_dir) + os.sep if quarantine_dir else None) if p)


class _Journal:
    """The journal of one ingest: a header line, then one record per file done (or, in this process, started)."""

    def __init__(self, path: str, header: dict, resume: bool):
        """Open the journal at ``path``: with ``resume``, read back an interrupted run's records, else start afresh.

        A file on which two runs died (each while reading it in its own process) is recorded as crashing the reader.
        """
        self.path = path
        found = _read_journal(path, header) if resume else None
        if resume and found is None:
            logger.warning("no usable journal beside the output: nothing to resume, starting from the beginning")
        self.done, started = found if found is not None else ({}, {})
        if found is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(json.dumps(header) + "\n")
        self._file = open(path, "a")
        for k, n in started.items():
            if n >= 2:  # two runs died while this one file was being read in their own process
                self.add(k, {"k": k, "t": "bad", "st": None, "c": False,
                             "reason": "the reader crashed on this file (the ingest died twice while reading it)"})
        self.from_journal = dict(self.done)  # (the pool's feeder thread walks while this thread records)

    def record(self, rec: dict) -> None:
        """Append one record to the journal."""
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()  # in the OS's hands as soon as the file is done: a SIGKILL loses nothing finished

    def add(self, token: str, rec: dict) -> None:
        """Record a file as done (``token``: its path token)."""
        self.record(rec)
        self.done[token] = rec

    def fresh(self, token: str, path: str) -> bool:
        """Whether the interrupted run finished the file, and the file has not changed since (size and time)."""
        rec = self.from_journal.get(token)
        return rec is not None and (rec.get("st") is None or rec["st"] == _stat(path))

    def close(self) -> None:
        """Close the journal file (it stays on disk until the ingest is done)."""
        self._file.close()


@dataclass(frozen=True)
class _Export:
    """The files to read: those under ``root`` but ``skip``, read by ``examine`` with the site ``key``."""
    root: str
    skip: tuple[str, ...]
    key: bytes
    examine: Callable[[tuple[str, str, bytes]], dict]

    def _pending(self, journal: _Journal) -> Iterator[tuple[str, str, bytes]]:
        """The tasks of the files the journal does not hold (or that changed since)."""
        for rel, path in _walk(self.root, self.skip):
            if not journal.fresh(file_token(rel, self.key), path):
                yield rel, path, self.key

    def _in_this_process(self, tasks: Iterator, journal: _Journal) -> Iterator[dict]:
        """``examine`` over ``tasks`` in this process, each file recorded as started before it is read."""
        for task in tasks:
            journal.record({"k": file_token(task[0], self.key), "t": "started"})  # a crash here is seen by the next run
            yield self.examine(task)

    def decode(self, journal: _Journal, workers: int, progress: bool, report: IngestReport) -> None:
        """Read the pending files (in ``workers`` processes when more than 1), each journaled as soon as it is done."""
        from tqdm import tqdm

        tasks = self._pending(journal)
        results = _in_processes(tasks, workers, self.examine) if workers > 1 else self._in_this_process(tasks, journal)
        for rec in tqdm(results, desc="ingest", unit="file", disable=not progress):
            journal.add(rec["k"], rec)
            report.decoded += 1

    def assemble(self, journal: _Journal, report: IngestReport) -> list[tuple[str, str, dict]]:
        """(relative path, path, record) of every file, from one more walk (names only), in walk order."""
        # the same order whatever the workers and the interruptions were
        entries = []
        for rel, path in _walk(self.root, self.skip):
            report.files_seen += 1
            token = file_token(rel, self.key)
            rec = journal.done.get(token)
            if rec is None:  # appeared since the first walk (an export still being copied): read it now
                rec = self.examine((rel, path, self.key))
                journal.add(token, rec)
                report.decoded += 1
            elif token in journal.from_journal and rec is journal.from_journal[token]:
                report.resumed += 1
            entries.append((rel, path, rec))
        return entries


def _unused_state_reason(kind: str, what: str, refs: list, wanted: bool, ds, accept_model_output: bool = False) -> str:
    """Why a presentation state / structured report gives no boxes ("" when it does)."""
    if not refs:
        return f"{what} references no usable image in the batch"
    if not wanted:
        return f"{what} ignored (run with --{kind} to read its boxes)"
    if not accept_model_output and is_model_output(ds):  # our model's answer, back from the PACS
        return f"{what} of model findings (not an annotation; --accept-model-output takes it)"
    return ""


class _Batch:
    """The files of one ingest sorted into items, presentation states / reports and quarantine, by written name."""

    def __init__(self, root: str, key: bytes, mode: str, output: str, report: IngestReport):
        """An empty batch; in ``uid`` mode, files are named through the link folder beside ``output``."""
        self.root, self.key, self.mode, self.report = root, key, mode, report
        report.path_mode = mode
        self.links = LinkFolder(link_folder_path(output)) if mode == "uid" else None
        self.images: dict[str, dict] = {}  # sop uid (or token, without a usable uid) -> item (image = the name written)
        self.sizes: dict[str, tuple[int, int]] = {}
        self.where: dict[str, str] = {}  # name -> path on disk (GSPS pass, near-duplicates, quarantine copies)
        self.states: list[tuple[str, str, str]] = []
        self.quarantined_paths: list[str] = []

    def quarantine(self, rel: str, path: str, reason: str) -> None:
        """Report a file as quarantined, under its name as written."""
        name = rel if self.mode == "relative" else f"{QUARANTINED}/{file_token(rel, self.key)}"
        self.report.quarantined.append((name, reason))
        self.quarantined_paths.append(path)
        if self.links is not None and os.path.lexists(path):
            self.links.link(path, name)

    def add(self, rel: str, path: str, rec: dict, external: dict[str, dict]) -> None:
        """Sort one file: quarantined, kept for the state pass, or an item (its boxes popped from ``external``)."""
        if rec["t"] == "bad":
            self.quarantine(rel, path, rec["reason"])
            return
        if rec["t"] in ("gsps", "sr"):
            self.states.append((rel, path, rec["t"]))
            return
        uid = rec["uid"]
        usable = valid_uid(uid)
        if usable and uid in self.images:
            self.quarantine(rel, path, f"duplicate SOPInstanceUID of {self.images[uid]['image']}")
            return
        name = rel if self.mode == "relative" else f"{uid if usable else rec['k']}.dcm"
        if self.links is not None:
            self.links.link(path, name)
        item = {"image": name, "label": 0, "boxes": [], "box_labels": [], "group": rec["group"]}
        ext = external.pop(os.path.abspath(path), None)
        if ext is not None:
            item["label"] = ext["label"]
            item["boxes"], item["box_labels"] = ext["boxes"], ext["box_labels"]
        ident = uid if usable else rec["k"]
        self.images[ident] = item
        self.sizes[ident] = tuple(rec["size"])
        self.where[name] = path

    def warn_unmatched(self, external: dict[str, dict]) -> None:
        """A box warning for each entry left in ``external``: it named no usable image."""
        for p in sorted(external):  # what is left of the boxes file named no usable image
            inside = not os.path.relpath(p, self.root).startswith("..")
            shown = (os.path.relpath(p, self.root).replace(os.sep, "/") if self.mode == "relative" else
                     file_token(os.path.relpath(p, self.root) if inside else p, self.key))
            self.report.box_warnings.append((shown, "listed in the boxes file but not a usable image in the batch"))

    def read_states(self, gsps: bool, sr: bool, accept_model_output: bool = False) -> None:
        """Read the presentation states and structured reports of the batch (``gsps`` / ``sr``: their boxes wanted)."""
        for rel, path, kind in self.states:
            self.read_state(rel, path, kind, gsps if kind == "gsps" else sr, accept_model_output)

    def read_state(self, rel: str, path: str, kind: str, wanted: bool, accept_model_output: bool = False) -> None:
        """Add a state's / report's boxes to its images, or quarantine it (``wanted``: its kind was asked for)."""
        what = "presentation state" if kind == "gsps" else "structured report"
        try:
            ds = read_dataset(path)
            refs = [u for u in (gsps_referenced_sop_uids(ds) if kind == "gsps" else sr_referenced_sop_uids(ds))
                    if u in self.images]
        except DicomReadError as e:
            self.quarantine(rel, path, _scrub(e.reason, path))
            return
        except Exception as e:  # a corrupt reference sequence is reported, never ends the batch
            self.quarantine(rel, path, f"{what} unreadable ({type(e).__name__})")
            return
        reason = _unused_state_reason(kind, what, refs, wanted, ds, accept_model_output)
        if reason:
            self.quarantine(rel, path, reason)
            return
        if kind == "gsps":
            self.report.presentation_states += 1
        else:
            self.report.structured_reports += 1
        try:
            found_boxes = read_gsps_file(path, self.sizes, dataset=ds) if kind == "gsps" else read_sr_file(path, ds)
        except DicomReadError as e:  # a corrupt presentation state / report is reported, never ends the batch
            self.quarantine(rel, path, _scrub(e.reason, path))
            return
        self._add_boxes(found_boxes, ds)

    def _add_boxes(self, found_boxes: dict, ds) -> None:
        """Append a state's boxes to their images; a label naming the patient (of ``ds``) becomes 'unlabelled'."""
        try:
            ids = header_identifiers(ds)  # the presentation state / report carries its patient's module
        except Exception:
            ids = frozenset()
        for uid, found in found_boxes.items():
            if uid in self.images:
                labels = [lab for _, lab in found]
                if any(path_carries_identifiers(lab, ids) for lab in labels):  # free text that names the patient
                    self.report.box_warnings.append((self.images[uid]["image"], "a box label held the patient's name, "
                                                     "ID or birth date: replaced by 'unlabelled'"))
                    labels = ["unlabelled" if path_carries_identifiers(lab, ids) else lab for lab in labels]
                self.images[uid]["boxes"] += [b.tolist() for b, _ in found]
                self.images[uid]["box_labels"] += labels

    def validated_items(self, labelled_by_boxes: bool) -> list[dict]:
        """The items, boxes checked against the image size (clipped / dropped reported), labelled by boxes if asked."""
        items = []
        for uid, item in self.images.items():
            if item["boxes"]:
                kept, labs, msgs = validate_boxes(
                    item["boxes"], self.sizes[uid], np.arange(len(item["boxes"])), source=item["image"], warn=False
                )
                self.report.box_warnings += [(item["image"], m.split(": ", 1)[1]) for m in msgs]
                item["box_labels"] = [item["box_labels"][int(i)] for i in labs]
                item["boxes"] = kept.round(2).tolist()
            if labelled_by_boxes:
                item["label"] = int(len(item["boxes"]) > 0)
            items.append(item)
        self.report.images = len(items)
        return items

    def write_datalist(self, items: list[dict], output: str, split, seed: int, near_duplicates: float | None) -> None:
        """Split ``items`` by group (near-duplicate groups merged when asked) and save the datalist to ``output``."""
        near = {}
        if split and near_duplicates:
            on_disk = [{**it, "image": self.where[it["image"]] if self.links is None else
                        os.path.join(self.links.folder, it["image"])} for it in items]
            merged, near, _ = group_near_duplicates_for_split(on_disk, near_duplicates, output)  # all readable here
            items = [{**it, "group": m["group"]} for it, m in zip(items, merged)]
            self.report.near_duplicates = near
        datalist = split_by_group(items, split, seed) if split else {"training": items, "validation": [], "test": []}
        links = self.links
        datalist["root"] = self.root if links is None else os.path.relpath(links.folder, os.path.dirname(output))
        datalist["ingest"] = {"files_seen": self.report.files_seen, "quarantined": len(self.report.quarantined),
                              "path_mode": self.mode, **near}
        save_datalist(datalist, output)


def _write_report(report: IngestReport, report_path: str, quarantined_paths: list[str],
                  quarantine_dir: str | None) -> None:
    """The quarantine report (CSV), copies of the quarantined files (with ``quarantine_dir``) and their log lines."""
    _write_report_csv(report, report_path)
    if quarantine_dir:
        _copy_quarantined(report.quarantined, quarantined_paths, quarantine_dir)
    for p, r in report.quarantined:
        logger.warning("quarantined %s: %s", p, r)


def _write_report_csv(report: IngestReport, report_path: str) -> None:
    """The quarantine report (CSV: file, status, reason), written whole or not at all."""
    tmp = report_path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "status", "reason"])
        for p, r in report.quarantined:
            w.writerow([p, "quarantined", r])
        for p, r in report.box_warnings:
            w.writerow([p, "box warning", r])
    os.replace(tmp, report_path)


def _copy_quarantined(quarantined: list, paths: list[str], quarantine_dir: str) -> None:
    """Copy the quarantined files (still there) into ``quarantine_dir`` under the names the report gives them."""
    os.makedirs(quarantine_dir, exist_ok=True)
    for (name, _), p in zip(quarantined, paths):
        if os.path.exists(p):
            shutil.copy2(p, os.path.join(quarantine_dir, name.replace("/", "__")))


def ingest(
    root: str,
    output: str,
    boxes: str | None = None,
    gsps: bool = False,
    sr: bool = False,
    split: tuple[float, float, float] | None = None,
    quarantine_dir: str | None = None,
    report_path: str | None = None,
    progress: bool = True,
    seed: int = 0,
    near_duplicates: float | None = None,
    path_mode: str = "auto",
    workers: int = 1,
    resume: bool = False,
    *,
    accept_model_output: bool = False,
    _examine_fn=None,
) -> IngestReport:
    """Walk ``root``, write the datalist to ``output`` and the quarantine report (CSV) beside it.

    Args:
        boxes: a plain CSV (``path,label,x0,y0,x1,y1,box_label``, paths relative to the CSV) or a datalist JSON.
        gsps: read boxes from Grayscale Softcopy Presentation States found in the tree.
        sr: read boxes from the image regions of structured reports (TID 1500) found in the tree
            (:mod:`cutremain_monai.io.sr`); with ``gsps`` too, both are read. An image's label is then 1 when it
            has a box.
        split: (train, val, test) fractions for a patient-wise split; default: everything under ``training``.
        quarantine_dir: copy quarantined files there (the originals are never moved or deleted), under the names
            the report gives them.
        near_duplicates: with ``split``, merge the patient groups of images whose thumbnails correlate at
            ``|r| >=`` this (the same radiograph exported twice under different PatientIDs); see
            :mod:`cutremain_monai.io.near_duplicates`.
        path_mode: ``auto`` | ``relative`` | ``uid`` (:mod:`cutremain_monai.io.paths`); ``auto`` decides on the
            whole batch (uid when any file's full path holds its own patient's name, ID or birth date).
        workers: processes that decode files (1: in this process).
        resume: continue the interrupted ingest whose journal is beside ``output`` (same root): files finished
            (and unchanged since) are not read again. In this process (``workers=1``), a file on which two runs
            died is reported as crashing the reader; with workers, a crashed process is found and reported at once.
        accept_model_output: take presentation states and reports written by a model of this project (our
            ``AI_FINDINGS`` states, our SRs) as annotations too; by default they are quarantined, so model output
            is never fed back as labels by accident.
        _examine_fn: (tests) the per-file function run in the worker processes.
    """
    _check_arguments(boxes, gsps, sr, workers, path_mode)
    report = IngestReport()
    key = site_key()  # read (or made) once: a bad key stops before any file is touched
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"export root is not a folder: {root}")
    external = _external_boxes(boxes) if boxes else {}
    output = os.path.abspath(output)
    report_path = os.path.abspath(report_path or os.path.splitext(output)[0] + "_quarantine.csv")
    export = _Export(root, _own_outputs(output, report_path, quarantine_dir), key, _examine_fn or _examine)
    journal = _Journal(journal_path(output), {"version": JOURNAL_VERSION, "root": keyed_pseudonym("root:" + root, key)},
                       resume)
    try:
        export.decode(journal, workers, progress, report)
        entries = export.assemble(journal, report)
    finally:
        journal.close()
    batch = _Batch(root, key, resolve_path_mode(path_mode, any(rec.get("c") for _, _, rec in entries)), output, report)
    for rel, path, rec in entries:
        batch.add(rel, path, rec, external)
    del entries
    batch.warn_unmatched(external)
    batch.read_states(gsps, sr, accept_model_output)
    batch.write_datalist(batch.validated_items(gsps or sr), output, split, seed, near_duplicates)
    _write_report(report, report_path, batch.quarantined_paths, quarantine_dir)
    os.unlink(journal.path)  # done: a later --resume starts afresh
    return report
