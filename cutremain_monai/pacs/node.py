"""A DICOM node for the pipeline: send results to a PACS (C-STORE SCU) and listen for images (Storage SCP) that
are scored by a bundle and answered with SR / Secondary Capture / presentation state (issue 15).

What this adds to pynetdicom (which speaks the protocol): what a hospital needs from an AI node around it.

* **Nothing is lost.** A result that cannot be sent (destination down, association rejected, a failure
  status) is kept in ``retry/`` with a JSON note of the reason and the number of attempts, and sent again with
  exponential backoff (``retry_pending``); what is still there is reported. A received object that is not a
  usable X-ray image is answered (so the sender does not retry for ever) and set aside in ``set_aside/`` with
  its reason in ``set_aside.csv``. A second copy of an SOP Instance already received is answered and processed
  once.
* **Studies, not single images.** Images are filed by Study Instance UID; a study is scored when it has been
  quiet for ``quiet_seconds`` (no new instance), through the bundle's own ``inference.yaml`` with
  ``dicom_out`` on (one pipeline for folders and for the node), and its results go back to ``forward``.
* **The node survives its own scoring** (issue 29). Studies are scored in a separate process
  (:mod:`cutremain_monai.pacs.worker`): a segmentation fault or the out-of-memory killer ends that process, not the
  node; the study is retried once, then set aside with the reason. Received data that does not decode is kept raw
  in ``quarantine/`` with the reason. Results go to the outbox (``retry/``) before the first try, so a node stopped
  at any moment delivers them when it starts again, once.
* **DIMSE or DICOMweb.** ``forward`` is a :class:`Destination` (C-STORE) or a
  :class:`~cutremain_monai.pacs.dicomweb.DicomWebServer` (STOW-RS); :class:`StudyNode` is shared with the
  DICOMweb watcher (:mod:`cutremain_monai.pacs.watch`).
* **No identifier in our files or logs.** Received files are named by SOP Instance UID, studies by a keyed
  token of their UID; logs name studies by token. The DICOM results carry the patient and study modules, as
  DICOM requires.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pydicom

from cutremain_monai.engines.bundle import run_bundle
from cutremain_monai.io.atomic import write_json_atomic
from cutremain_monai.io.paths import file_token, valid_uid
from cutremain_monai.io.pseudonyms import keyed_pseudonym, site_key
from cutremain_monai.pacs.dicomweb import DicomWebServer, stow_files
from cutremain_monai.pacs.worker import ScoringError, ScoringWorker, WorkerCrashed

__all__ = ["Destination", "send_files", "send_folder", "deliver", "RetryQueue", "StudyNode", "Listener",
           "parse_destination", "score_batch", "is_xray_image", "XRAY_SOP_CLASS_UIDS"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    ae_title: str

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str, **dicomweb) -> Destination | DicomWebServer:
    """``HOST:PORT:AET`` -> :class:`Destination` (DIMSE); ``http(s)://...`` -> :class:`DicomWebServer` (STOW-RS,
    with ``dicomweb``: ``auth_env``, ``auth_file``, ``ca_bundle``, ``timeout``, ``max_concurrent``); a
    ``ValueError`` naming what is wrong."""
    if text.startswith(("http://", "https://")):
        return DicomWebServer(text, **{k: v for k, v in dicomweb.items() if v is not None})
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise ValueError(f"destination must be HOST:PORT:AET or a DICOMweb http(s):// URL, got {text!r}")
    try:
        port = int(parts[1])
    except ValueError:
        raise ValueError(f"destination port must be a number, got {parts[1]!r} in {text!r}") from None
    if not 0 < port < 65536 or len(parts[2]) > 16:
        raise ValueError(f"destination {text!r}: port 1-65535 and an AE title of at most 16 characters")
    return Destination(parts[0], port, parts[2])


def _contexts(paths: Sequence[str]) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """``{path: (SOP class, transfer syntax)}`` from the headers only, and ``{path: reason}`` of the unreadable."""
    keys, bad = {}, {}
    for p in paths:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            keys[p] = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        except Exception as e:
            bad[p] = f"unreadable ({type(e).__name__})"
    return keys, bad


def send_files(paths: Sequence[str], dest: Destination, calling_ae: str = "CUTREMAIN",
               timeout: float = 30.0) -> dict[str, str]:
    """C-STORE each file to ``dest`` over one association; returns ``{path: ""}`` for success and
    ``{path: reason}`` otherwise (the association not established is a reason for every file). The batch is
    streamed: headers are read first (for the presentation contexts), then each file is read, sent and let go."""
    from pynetdicom import AE
    from pynetdicom.status import code_to_category

    keys, result = _contexts(paths)
    if not keys:
        return result
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class, ts in sorted(set(keys.values())):
        ae.add_requested_context(sop_class, [ts, "1.2.840.10008.1.2.1"] if ts != "1.2.840.10008.1.2.1" else [ts])
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    except Exception as e:  # DNS, refused connection, ...
        return {**result, **{p: f"association to {dest} failed ({type(e).__name__})" for p in keys}}
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        return {**result, **{p: f"association to {dest} {why}" for p in keys}}
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
    try:
        for p, key in keys.items():
            try:
                ds = pydicom.dcmread(p)
                if key not in accepted and ds.file_meta.TransferSyntaxUID.is_compressed and \
                        (key[0], "1.2.840.10008.1.2.1") in accepted:
                    ds.decompress(generate_instance_uid=False)  # the peer takes no compressed syntax for this
                    # class: the same instance, uncompressed (lossless: its UID stays)
                status = assoc.send_c_store(ds)
                del ds
            except Exception as e:
                result[p] = f"C-STORE failed ({type(e).__name__})"  # (never the text: it can quote values)
                continue
            code = int(getattr(status, "Status", 0xC000)) if status else 0xC000
            ok = code_to_category(code) in ("Success", "Warning")  # (0xB000, 0xB007, 0xB006, 0x0001, 0x0107, ...)
            result[p] = "" if ok else f"C-STORE status 0x{code:04X}"
    finally:
        assoc.release()
    return result


def deliver(paths: Sequence[str], dest: Destination | DicomWebServer, calling_ae: str = "CUTREMAIN",
            warnings: dict[str, str] | None = None, info: dict[str, dict] | None = None) -> dict[str, str]:
    """``paths`` to ``dest``: C-STORE (:func:`send_files`) or STOW-RS (:func:`~cutremain_monai.pacs.dicomweb.
    stow_files`); ``{path: ""}`` delivered, ``{path: reason}`` not (``info``: per failed path, ``permanent`` or
    ``retry_after``, where the destination says)."""
    if isinstance(dest, DicomWebServer):
        return stow_files(paths, dest, warnings, info)
    return send_files(paths, dest, calling_ae)


def _dest_note(dest: Destination | DicomWebServer):
    """How a destination is written in a retry note: the URL of a DICOMweb server (never its credentials)."""
    if isinstance(dest, DicomWebServer):
        return {"dicomweb": dest.safe_url()}
    return [dest.host, dest.port, dest.ae_title]


class RetryQueue:
    """Results not delivered yet: each file in ``folder`` beside ``<file>.json`` (destination, reason, attempts,
    next try). It is the node's outbox: results are put here before the first try (:meth:`send_now`), so a node
    that stops at any moment delivers them when it starts again, and a delivered file is removed at once (never
    sent twice). ``add`` keeps a copy after a failure; ``retry_due`` sends what is due and backs off what fails
    again (``base_delay * 2**attempts``, at most ``max_delay``; later when the server says so with
    ``Retry-After``). A failure that sending again cannot cure (a DICOMweb 4xx other than 401 / 403 / 408 / 429,
    an instance's ``FailureReason``) moves the file to ``failed_folder`` (default ``<folder>/../failed``) with its
    note, instead of being retried for ever. A DICOMweb destination is written by its URL; its
    :class:`DicomWebServer` (credentials, CA bundle) must be given in ``servers`` for its files to be retried."""
    def __init__(self, folder: str, base_delay: float = 5.0, max_delay: float = 3600.0,
                 servers: Sequence[DicomWebServer] = (), failed_folder: str | None = None):
        self.folder = folder
        self.failed_folder = failed_folder or os.path.join(os.path.dirname(os.path.abspath(folder)), "failed")
        self.base_delay, self.max_delay = base_delay, max_delay
        self.servers = {s.safe_url(): s for s in servers}
        os.makedirs(folder, exist_ok=True)
        self._lock = threading.Lock()
        self.warnings: dict[str, str] = {}  # file name -> why it was stored with a warning (DICOMweb)

    def _keep(self, path: str) -> str:
        kept = os.path.join(self.folder, os.path.basename(path))
        if os.path.abspath(kept) != os.path.abspath(path):
            shutil.copy2(path, kept + ".tmp")
            os.replace(kept + ".tmp", kept)
        return kept

    def _write_note(self, kept: str, note: dict) -> None:
        write_json_atomic(kept + ".json", note)  # a crash never leaves a torn note

    def add(self, path: str, dest: Destination | DicomWebServer, reason: str, retry_after: float | None = None) -> str:
        with self._lock:
            kept = self._keep(path)
            note = self._note(kept)
            attempts = note.get("attempts", 0) + 1
            delay = min(self.max_delay, self.base_delay * 2 ** min(attempts - 1, 30))
            if retry_after is not None:  # the server said when: not before
                delay = max(delay, min(float(retry_after), 24 * 3600.0))
            note.update(destination=_dest_note(dest), reason=reason, attempts=attempts, next_try=time.time() + delay)
            self._write_note(kept, note)
        logger.warning("result %s kept for retry (%s), attempt %d", os.path.basename(kept), reason, attempts)
        return kept

    def fail(self, path: str, dest: Destination | DicomWebServer, reason: str) -> str:
        """Move an outbox file whose failure is permanent to ``failed_folder`` with its note (and the reason)."""
        with self._lock:
            kept = self._keep(path)
            note = self._note(kept)
            note.update(destination=_dest_note(dest), reason=reason, attempts=note.get("attempts", 0) + 1,
                        failed_at=time.time())
            os.makedirs(self.failed_folder, exist_ok=True)
            moved = os.path.join(self.failed_folder, os.path.basename(kept))
            write_json_atomic(moved + ".json", note)
            os.replace(kept, moved)
            if os.path.exists(kept + ".json"):
                os.unlink(kept + ".json")
        logger.error("result %s not storable (%s): moved to %s", os.path.basename(kept), reason, self.failed_folder)
        return moved

    def failed(self) -> list[dict]:
        """The results moved to ``failed_folder``, with their notes."""
        if not os.path.isdir(self.failed_folder):
            return []
        return [{"file": n, **self._note(os.path.join(self.failed_folder, n))}
                for n in sorted(os.listdir(self.failed_folder)) if not n.endswith((".json", ".tmp"))]

    def enqueue(self, paths: Sequence[str], dest: Destination | DicomWebServer) -> list[str]:
        """Put ``paths`` in the outbox for ``dest`` (no attempt yet, due now); their paths in the outbox."""
        kept = []
        with self._lock:
            for p in paths:
                k = self._keep(p)
                if not os.path.exists(k + ".json"):
                    self._write_note(k, {"destination": _dest_note(dest), "reason": "not sent yet", "attempts": 0,
                                         "next_try": 0.0})
                kept.append(k)
        return kept

    def _note(self, kept: str) -> dict:
        try:
            with open(kept + ".json") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def pending(self) -> list[dict]:
        out = []
        for name in sorted(os.listdir(self.folder)):
            if name.endswith((".json", ".tmp")):
                continue
            note = self._note(os.path.join(self.folder, name))
            out.append({"file": name, **note})
        return out

    def _destination(self, note) -> Destination | DicomWebServer | None:
        if isinstance(note, dict):
            return self.servers.get(note.get("dicomweb", ""))
        return Destination(*note) if note else None

    def send_now(self, kept: Sequence[str], dest: Destination | DicomWebServer, calling_ae: str = "CUTREMAIN") -> dict[str, str]:
        """Deliver outbox files ``kept`` to ``dest`` now: delivered ones are removed, the others backed off with
        the reason; ``{path: reason}`` ("" delivered)."""
        warnings: dict[str, str] = {}
        info: dict[str, dict] = {}
        result = deliver(kept, dest, calling_ae, warnings, info)
        for p, reason in result.items():
            if reason and info.get(p, {}).get("permanent"):
                self.fail(p, dest, reason)
                continue
            if reason:
                self.add(p, dest, reason, retry_after=info.get(p, {}).get("retry_after"))
                continue
            with self._lock:
                if p in warnings:
                    self.warnings[os.path.basename(p)] = warnings[p]
                for f in (p, p + ".json"):
                    if os.path.exists(f):
                        os.unlink(f)
        return result

    def retry_due(self, now: float | None = None, calling_ae: str = "CUTREMAIN") -> int:
        """Send every due file again; returns how many were delivered (and removed)."""
        now = time.time() if now is None else now
        due: dict = {}
        for item in self.pending():
            dest = self._destination(item.get("destination"))
            if item.get("next_try", 0) <= now and dest is not None:
                due.setdefault(dest, []).append(os.path.join(self.folder, item["file"]))
        delivered = 0
        for dest, paths in due.items():
            delivered += sum(1 for r in self.send_now(paths, dest, calling_ae).values() if not r)
        return delivered


# CR, DX / MG / IO for presentation, and secondary capture (some PACS store digitised films so)
XRAY_SOP_CLASS_UIDS = frozenset(["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
                                 "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.3",
                                 "1.2.840.10008.5.1.4.1.1.7"])


def is_xray_image(ds) -> str:
    """"" when ``ds`` can be scored, else why not."""
    sop = str(ds.get("SOPClassUID", ""))
    if sop not in XRAY_SOP_CLASS_UIDS:
        return "not a projection X-ray for presentation (CR / DX / MG / IO / SC)"
    for kw in ("SOPInstanceUID", "StudyInstanceUID"):
        if not valid_uid(str(ds.get(kw, ""))):
            return f"{kw} missing or not a valid UID"
    if "PixelData" not in ds:
        return "no pixel data"
    if str(ds.get("PhotometricInterpretation", "")) not in ("MONOCHROME1", "MONOCHROME2"):
        return "not a greyscale image"
    return ""


def score_batch(bundle: str, configs: Sequence[str], settings: dict) -> dict:
    """Run the bundle's ``inference.yaml`` with ``dicom_out`` over one batch (in the scoring process): the result
    files of its ``manifest.csv`` and how many images got none."""
    run_bundle(bundle, list(configs) + ["inference.yaml"], workflow_type="infer", **settings)
    out = settings["dicom_out_dir"]
    with open(os.path.join(out, "manifest.csv")) as f:
        rows = list(csv.DictReader(f))
    return {"files": [os.path.join(out, r["path"]) for r in rows if r["path"]],
            "not_written": sum(1 for r in rows if r["error"])}


class StudyNode:
    """What the DICOM listener and the DICOMweb watcher share: studies filed by a keyed token of their UID under
    ``incoming/``, scored once quiet in a separate scoring process (:class:`~cutremain_monai.pacs.worker.
    ScoringWorker`: a crash of a decoder or the model never ends the node; the study is retried once, then set
    aside with the reason), results put in the outbox (``retry/``) and delivered to ``forward``.

    Work folder: ``incoming/<study>/`` (received, not scored), ``batches/`` (being scored: put back on start),
    ``scored/<study>/``, ``results/<study>/<batch>/``, ``retry/`` (outbox), ``set_aside/`` and ``set_aside.csv``
    (objects and studies that will not be scored, with the reason), ``quarantine/`` and ``quarantine.csv``
    (received data that could not be decoded, kept raw). Files are named by SOP Instance UID or token, never by a
    patient identifier."""

    def __init__(self, bundle: str, work_dir: str, forward: Destination | DicomWebServer, ae_title: str = "CUTREMAIN",
                 configs: Sequence[str] = ("train.yaml",), overrides: dict | None = None, quiet_seconds: float = 5.0,
                 retry_base_delay: float = 5.0, score_fn=score_batch, score_timeout: float | None = 3600.0,
                 study_retry_delay: float = 30.0):
        self.bundle, self.work_dir, self.forward = os.path.abspath(bundle), os.path.abspath(work_dir), forward
        self.ae_title = ae_title
        self.configs = list(configs)
        self.overrides = dict(overrides or {})
        self.quiet_seconds = float(quiet_seconds)
        self.study_retry_delay = float(study_retry_delay)
        self.key = site_key()
        for sub in ("incoming", "results", "set_aside", "scored", "batches", "quarantine"):
            os.makedirs(os.path.join(self.work_dir, sub), exist_ok=True)
        servers = [forward] if isinstance(forward, DicomWebServer) else []
        self.retry = RetryQueue(os.path.join(self.work_dir, "retry"), base_delay=retry_base_delay, servers=servers)
        self.score_fn = score_fn
        self.worker = ScoringWorker(timeout=score_timeout)
        self._last: dict[str, float] = {}  # study token -> time of its last instance
        self._seen: set[str] = set()  # SOP Instance UIDs received or handled (a second copy is processed once)
        self.ledger_path = os.path.join(self.work_dir, "handled_uids.txt")
        self._pending: set[str] = set()  # being written
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker_thread = None
        self.scored: list[dict] = []  # per study: token, images, results sent, kept for retry
        self.received = 0
        self.duplicates = 0
        self._recover()

    def _recover(self) -> None:
        """A restarted node knows what it has, and scores what it had not: a batch cut short goes back to
        ``incoming/`` (its results, if any were made, are the same instances again), and every instance under
        ``incoming/``, ``scored/`` and ``set_aside/<study>/`` is known."""
        batches = os.path.join(self.work_dir, "batches")
        for b in os.listdir(batches):
            token = b.rsplit("-", 1)[0]
            folder = os.path.join(self.work_dir, "incoming", token)
            os.makedirs(folder, exist_ok=True)
            for f in os.listdir(os.path.join(batches, b)):
                os.replace(os.path.join(batches, b, f), os.path.join(folder, f))
            shutil.rmtree(os.path.join(batches, b), ignore_errors=True)
        for sub in ("incoming", "scored", "set_aside"):
            for d in os.listdir(os.path.join(self.work_dir, sub)):
                if not os.path.isdir(os.path.join(self.work_dir, sub, d)):
                    continue
                names = [f for f in os.listdir(os.path.join(self.work_dir, sub, d)) if f.endswith(".dcm")]
                self._seen.update(f[:-4] for f in names)
                if sub == "incoming" and names:
                    self._last[d] = 0.0
        if os.path.exists(self.ledger_path):  # set aside, quarantined, scored: never retrieved or scored again
            with open(self.ledger_path) as f:
                self._seen.update(line.strip() for line in f if valid_uid(line.strip()))

    def _handled(self, uids) -> None:
        """Record SOP Instance UIDs as handled (scored, set aside, quarantined) in the ledger ``handled_uids.txt``
        (appended and flushed to disk; one UID a line, nothing else): a restarted node, and ``watch``'s next poll,
        know them without retrieving them again."""
        uids = [u for u in uids if u and valid_uid(u)]
        if not uids:
            return
        with self._lock:
            self._seen.update(uids)
            with open(self.ledger_path, "a") as f:
                f.write("".join(u + "\n" for u in uids))
                f.flush()
                os.fsync(f.fileno())

    def _arrived(self, token: str) -> None:
        """A new instance of study ``token`` was filed (called under the lock): it is due ``quiet_seconds`` on."""
        self._last[token] = time.time()

    def study_token(self, study_uid: str) -> str:
        return "s" + keyed_pseudonym("study:" + study_uid, self.key)

    def _report_row(self, report: str, name: str, reason: str) -> None:
        path = os.path.join(self.work_dir, report)
        with self._lock:
            new = not os.path.exists(path)
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["file", "reason"])
                w.writerow([name, reason])

    def set_aside(self, ds, reason: str, sop_uid: str | None = None) -> None:
        """Keep a received object that will not be scored (not an X-ray image ...) with its reason; its SOP
        Instance UID (``sop_uid``, else the dataset's) goes in the ledger."""
        self._handled([sop_uid or str(ds.get("SOPInstanceUID", ""))])
        token = file_token("received:" + str(ds.get("SOPInstanceUID", "")) + str(time.time_ns()), self.key)
        path = os.path.join(self.work_dir, "set_aside", token + ".dcm")
        try:
            ds.save_as(path, enforce_file_format=False)
        except Exception:
            path = ""
        self._report_row("set_aside.csv", os.path.basename(path) or token, reason)
        logger.warning("received object set aside: %s", reason)

    def quarantine(self, raw: bytes | None, reason: str, sop_uid: str | None = None) -> None:
        """Keep received data that could not be decoded as it came (raw bytes), with the reason; ``sop_uid`` (when
        known from the query that found it) goes in the ledger."""
        self._handled([sop_uid or ""])
        token = file_token(f"quarantine:{time.time_ns()}:{threading.get_ident()}", self.key)
        name = ""
        if raw:
            name = token + ".raw"
            with open(os.path.join(self.work_dir, "quarantine", name), "wb") as f:
                f.write(raw)
        self._report_row("quarantine.csv", name or token, reason)
        logger.warning("received data quarantined: %s", reason)

    def file_instance(self, ds) -> str:
        """File a received X-ray image under its study (``""``), or say why not: ``"duplicate"`` or an error."""
        uid = str(ds.SOPInstanceUID)  # (a valid UID: checked by is_xray_image, so it is safe as a file name)
        with self._lock:
            if uid in self._seen or uid in self._pending:
                self.duplicates += 1
                return "duplicate"
            self._pending.add(uid)
        token = self.study_token(str(ds.StudyInstanceUID))
        folder = os.path.join(self.work_dir, "incoming", token)
        try:
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{uid}.tmp")
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, os.path.join(folder, uid + ".dcm"))  # never a torn file under the final name
        except Exception as e:
            with self._lock:
                self._pending.discard(uid)
            return f"not stored ({type(e).__name__})"
        with self._lock:
            self._pending.discard(uid)
            self._seen.add(uid)
            self._arrived(token)
        return ""

    def known(self, sop_uid: str) -> bool:
        with self._lock:
            return sop_uid in self._seen or sop_uid in self._pending

    # --- scoring and answering ---
    def _score(self, token: str) -> None:
        """Score the instances of study ``token`` received so far (moved to a batch folder first: an instance
        that arrives meanwhile waits for the next batch, so nothing is scored twice) in the scoring process, put
        the results in the outbox, file the instances under ``scored/`` and deliver. A failure (an error, or the
        scoring process dying) puts the instances back for one more try; a second sets the study aside."""
        incoming = os.path.join(self.work_dir, "incoming", token)
        names = sorted(f for f in os.listdir(incoming) if f.endswith(".dcm")) if os.path.isdir(incoming) else []
        if not names:
            return
        seq = time.time_ns()
        batch = os.path.join(self.work_dir, "batches", f"{token}-{seq}")
        os.makedirs(batch)
        for f in names:
            os.replace(os.path.join(incoming, f), os.path.join(batch, f))
        out = os.path.join(self.work_dir, "results", token, str(seq))
        settings = {"datalist_task": None, **self.overrides, "input_dir": batch,
                    "dicom_out": True, "dicom_out_dir": out, "inference_dir": os.path.join(out, "inference"),
                    "inference_cam": False}
        record = {"study": token, "images": len(names), "sent": 0, "kept_for_retry": 0, "not_written": 0}
        try:
            answer = self.worker.run(self.score_fn, self.bundle, self.configs, settings)
        except (WorkerCrashed, ScoringError, OSError) as e:
            self._failed(token, names, batch, str(e) if not isinstance(e, OSError) else type(e).__name__, record)
            return
        self._failures.pop(token, None)
        record["not_written"] = answer["not_written"]
        kept = self.retry.enqueue(answer["files"], self.forward)  # the outbox first: a stop from here on loses nothing
        done = os.path.join(self.work_dir, "scored", token)
        os.makedirs(done, exist_ok=True)
        for f in names:
            os.replace(os.path.join(batch, f), os.path.join(done, f))
        shutil.rmtree(batch, ignore_errors=True)
        self._handled([f[:-4] for f in names])
        for p, reason in self.retry.send_now(kept, self.forward, self.ae_title).items():
            key = "sent" if not reason else "kept_for_retry" if os.path.exists(p) else "failed"  # (failed/: permanent)
            record[key] = record.get(key, 0) + 1
        self.scored.append(record)
        logger.info("study %s: %d images scored, %d results sent, %d kept for retry, %d not written", token,
                    record["images"], record["sent"], record["kept_for_retry"], record["not_written"])

    def _failed(self, token: str, names: list[str], batch: str, why: str, record: dict) -> None:
        failures = self._failures[token] = self._failures.get(token, 0) + 1
        record["error"] = why
        if failures < 2:  # back where they came from: the study is tried once more
            incoming = os.path.join(self.work_dir, "incoming", token)
            os.makedirs(incoming, exist_ok=True)
            for f in names:
                os.replace(os.path.join(batch, f), os.path.join(incoming, f))
            with self._lock:
                self._last[token] = time.time() + self.study_retry_delay - self.quiet_seconds
            logger.error("study %s not scored (%s): tried again", token, why)
        else:  # set aside with the reason: the node goes on with the other studies
            aside = os.path.join(self.work_dir, "set_aside", token)
            os.makedirs(aside, exist_ok=True)
            for f in names:
                os.replace(os.path.join(batch, f), os.path.join(aside, f))
            self._handled([f[:-4] for f in names])
            self._failures.pop(token, None)
            self._report_row("set_aside.csv", f"{token}/", f"study not scored twice: {why}")
            record["set_aside"] = True
            logger.error("study %s set aside after two failures (%s)", token, why)
        shutil.rmtree(batch, ignore_errors=True)
        self.scored.append(record)

    def score_due(self) -> None:
        """Score every study quiet for ``quiet_seconds``, then retry what is due in the outbox."""
        now = time.time()
        with self._lock:
            due = [t for t, last in self._last.items() if now - last >= self.quiet_seconds]
            for t in due:
                del self._last[t]
        for t in due:
            try:
                self._score(t)
            except Exception as e:  # the node never stops for one study
                logger.error("study %s: %s", t, type(e).__name__)
        try:
            self.retry.retry_due(calling_ae=self.ae_title)
        except Exception as e:  # never stop the node for a retry
            logger.warning("retry failed (%s)", type(e).__name__)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.score_due()

    def start_scoring(self) -> None:
        self._worker_thread = threading.Thread(target=self._loop, name="cutremain-scoring-loop", daemon=True)
        self._worker_thread.start()

    def idle(self) -> bool:
        with self._lock:
            return not self._last

    def stop_scoring(self) -> None:
        self._stop.set()
        if self._worker_thread is not None:
            self._worker_thread.join()
        self.worker.close()

    def report(self) -> dict:
        return {"received": self.received, "duplicates": self.duplicates, "studies": self.scored,
                "pending_retry": self.retry.pending(), "failed": self.retry.failed(),
                "stored_with_warning": dict(self.retry.warnings)}


class Listener(StudyNode):
    """A Storage SCP that scores completed studies with a bundle and sends the results to ``forward``.

    Args:
        bundle: the bundle's folder; configs: its configs before ``inference.yaml`` (``train.yaml``, ``cpu.yaml``).
        work_dir: incoming/, results/, retry/, set_aside/, quarantine/ and the reports (:class:`StudyNode`).
        forward: where the SR / SC / PR go (:class:`Destination`, or a :class:`DicomWebServer` for STOW-RS).
        overrides: bundle settings (``output_dir`` holding the trained checkpoint, ``image_size`` ...).
        quiet_seconds: a study is scored this long after its last instance arrived.
    """
    def __init__(self, bundle: str, work_dir: str, forward: Destination | DicomWebServer, ae_title: str = "CUTREMAIN",
                 port: int = 11112, host: str = "127.0.0.1", **kwargs):
        super().__init__(bundle, work_dir, forward, ae_title=ae_title, **kwargs)
        self.port, self.host = int(port), host
        self._server = None

    def _on_store(self, event):
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            reason = is_xray_image(ds)  # (reads the elements: a dataset that does not decode fails here)
        except Exception as e:  # undecodable: answered, kept raw with the reason
            try:
                raw = event.encoded_dataset()
            except Exception:
                raw = None
            self.quarantine(raw, f"received dataset undecodable ({type(e).__name__})")
            with self._lock:
                self.received += 1
            return 0x0000
        with self._lock:
            self.received += 1
        if reason:
            self.set_aside(ds, reason)
            return 0x0000  # answered: the sender must not retry a file we will never score
        filed = self.file_instance(ds)
        if filed and filed != "duplicate":  # not kept: answered with a failure, so the sender sends it again
            logger.error("received instance %s", filed)
            return 0xA700  # out of resources
        return 0x0000

    def start(self) -> None:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:  # every storage class, in every transfer syntax (a PACS sends
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)  # what it stored)
        ae.add_supported_context(Verification)
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.start_scoring()
        logger.info("listening as %s on %s:%d, results to %s", self.ae_title, self.host, self.port, self.forward)

    def stop(self) -> None:
        if self._server is not None:  # no new instance first; then the scoring thread ends (what it has not
            self._server.shutdown()  # scored stays in incoming/ and is scored when the node starts again)
        self.stop_scoring()


def send_folder(folder: str, dest: Destination | DicomWebServer, calling_ae: str = "CUTREMAIN",
                warnings: dict[str, str] | None = None) -> dict[str, str]:
    """The objects of ``folder``'s ``manifest.csv`` (a ``--dicom-out`` folder), else every file under it, to
    ``dest`` (C-STORE or STOW-RS); ``{relative path: reason}`` of the ones not sent (``warnings``: those stored
    with a warning)."""
    manifest = os.path.join(folder, "manifest.csv")
    if os.path.exists(manifest):
        with open(manifest) as f:
            paths = [os.path.join(folder, r["path"]) for r in csv.DictReader(f) if r.get("path")]
    else:
        paths = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in sorted(fs)
                 if not f.endswith((".json", ".csv", ".tmp"))]
    found: dict[str, str] = {}
    result = deliver(paths, dest, calling_ae, found)
    if warnings is not None:
        warnings.update({os.path.relpath(p, folder): w for p, w in found.items()})
    return {os.path.relpath(p, folder): r for p, r in result.items() if r}
