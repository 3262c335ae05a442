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

from cutremain_monai.engines.bundle import run_bundle
from cutremain_monai.io.paths import file_token, valid_uid
from cutremain_monai.io.pseudonyms import keyed_pseudonym, site_key

__all__ = ["Destination", "send_files", "send_folder", "RetryQueue", "Listener", "parse_destination"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    ae_title: str

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    """``HOST:PORT:AET`` -> :class:`Destination` (``ValueError`` naming what is wrong)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise ValueError(f"destination must be HOST:PORT:AET, got {text!r}")
    try:
        port = int(parts[1])
    except ValueError:
        raise ValueError(f"destination port must be a number, got {parts[1]!r} in {text!r}") from None
    if not 0 < port < 65536 or len(parts[2]) > 16:
        raise ValueError(f"destination {text!r}: port 1-65535 and an AE title of at most 16 characters")
    return Destination(parts[0], port, parts[2])


def send_files(paths: Sequence[str], dest: Destination, calling_ae: str = "CUTREMAIN",
               timeout: float = 30.0) -> dict[str, str]:
    """C-STORE each file to ``dest`` over one association; returns ``{path: ""}`` for success and
    ``{path: reason}`` otherwise (the association not established is a reason for every file)."""
    import pydicom
    from pynetdicom import AE

    datasets = {}
    result: dict[str, str] = {}
    for p in paths:
        try:
            datasets[p] = pydicom.dcmread(p)
        except Exception as e:
            result[p] = f"unreadable ({type(e).__name__})"
    if not datasets:
        return result
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class, ts in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets.values()}):
        ae.add_requested_context(sop_class, [ts, "1.2.840.10008.1.2.1"] if ts != "1.2.840.10008.1.2.1" else [ts])
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    except Exception as e:  # DNS, refused connection, ...
        return {**result, **{p: f"association to {dest} failed ({type(e).__name__})" for p in datasets}}
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        return {**result, **{p: f"association to {dest} {why}" for p in datasets}}
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
    try:
        for p, ds in datasets.items():
            try:
                key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                if key not in accepted and ds.file_meta.TransferSyntaxUID.is_compressed and \
                        (key[0], "1.2.840.10008.1.2.1") in accepted:
                    ds.decompress(generate_instance_uid=False)  # the peer takes no compressed syntax for this
                    # class: the same instance, uncompressed (lossless: its UID stays)
                status = assoc.send_c_store(ds)
            except Exception as e:
                result[p] = f"C-STORE failed ({type(e).__name__}: {e})"
                continue
            from pynetdicom.status import code_to_category

            code = int(getattr(status, "Status", 0xC000)) if status else 0xC000
            ok = code_to_category(code) in ("Success", "Warning")  # (0xB000, 0xB007, 0xB006, 0x0001, 0x0107, ...)
            result[p] = "" if ok else f"C-STORE status 0x{code:04X}"
    finally:
        assoc.release()
    return result


class RetryQueue:
    """Results that could not be sent: each file in ``folder`` beside ``<file>.json`` (destination, reason,
    attempts, next try). ``add`` keeps a copy; ``retry_due`` sends what is due and backs off what fails again
    (``base_delay * 2**attempts``, at most ``max_delay``)."""
    def __init__(self, folder: str, base_delay: float = 5.0, max_delay: float = 3600.0):
        self.folder = folder
        self.base_delay, self.max_delay = base_delay, max_delay
        os.makedirs(folder, exist_ok=True)
        self._lock = threading.Lock()

    def add(self, path: str, dest: Destination, reason: str) -> str:
        with self._lock:
            name = os.path.basename(path)
            kept = os.path.join(self.folder, name)
            if os.path.abspath(kept) != os.path.abspath(path):
                shutil.copy2(path, kept)
            note = self._note(kept)
            attempts = note.get("attempts", 0) + 1
            delay = min(self.max_delay, self.base_delay * 2 ** min(attempts - 1, 30))
            note.update(destination=[dest.host, dest.port, dest.ae_title], reason=reason, attempts=attempts,
                        next_try=time.time() + delay)
            with open(kept + ".json.tmp", "w") as f:
                json.dump(note, f)
            os.replace(kept + ".json.tmp", kept + ".json")  # a crash never leaves a torn note
        logger.warning("result %s kept for retry (%s), attempt %d", name, reason, attempts)
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

    def retry_due(self, now: float | None = None, calling_ae: str = "CUTREMAIN") -> int:
        """Send every due file again; returns how many were delivered (and removed)."""
        now = time.time() if now is None else now
        due: dict[Destination, list[str]] = {}
        for item in self.pending():
            if item.get("next_try", 0) <= now and item.get("destination"):
                due.setdefault(Destination(*item["destination"]), []).append(os.path.join(self.folder, item["file"]))
        delivered = 0
        for dest, paths in due.items():
            for p, reason in send_files(paths, dest, calling_ae).items():
                if reason:
                    self.add(p, dest, reason)
                else:
                    delivered += 1
                    with self._lock:
                        os.unlink(p)
                        if os.path.exists(p + ".json"):
                            os.unlink(p + ".json")
        return delivered


# CR, DX / MG / IO for presentation, and secondary capture (some PACS store digitised films so)
XRAY_SOP_CLASS_UIDS = frozenset(["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
                                 "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.3",
                                 "1.2.840.10008.5.1.4.1.1.7"])


def _is_xray_image(ds) -> str:
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


class Listener:
    """A Storage SCP that scores completed studies with a bundle and sends the results to ``forward``.

    Args:
        bundle: the bundle's folder; configs: its configs before ``inference.yaml`` (``train.yaml``, ``cpu.yaml``).
        work_dir: incoming/, results/, retry/, set_aside/ and the reports.
        forward: where the SR / SC / PR go (:class:`Destination`).
        overrides: bundle settings (``output_dir`` holding the trained checkpoint, ``image_size`` ...).
        quiet_seconds: a study is scored this long after its last instance arrived.
    """
    def __init__(self, bundle: str, work_dir: str, forward: Destination, ae_title: str = "CUTREMAIN",
                 port: int = 11112, host: str = "127.0.0.1", configs: Sequence[str] = ("train.yaml",),
                 overrides: dict | None = None, quiet_seconds: float = 5.0, retry_base_delay: float = 5.0):
        self.bundle, self.work_dir, self.forward = os.path.abspath(bundle), os.path.abspath(work_dir), forward
        self.ae_title, self.port, self.host = ae_title, int(port), host
        self.configs = list(configs)
        self.overrides = dict(overrides or {})
        self.quiet_seconds = float(quiet_seconds)
        self.key = site_key()
        for sub in ("incoming", "results", "set_aside"):
            os.makedirs(os.path.join(self.work_dir, sub), exist_ok=True)
        self.retry = RetryQueue(os.path.join(self.work_dir, "retry"), base_delay=retry_base_delay)
        self._last: dict[str, float] = {}  # study token -> time of its last instance
        self._seen: set[str] = set()  # SOP Instance UIDs received (a second copy is processed once)
        self._pending: set[str] = set()  # being written
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = None
        self._worker = None
        self.scored: list[dict] = []  # per study: token, images, results sent, kept for retry
        self.received = 0
        self.duplicates = 0
        os.makedirs(os.path.join(self.work_dir, "scored"), exist_ok=True)
        for sub in ("incoming", "scored"):  # a restarted node knows what it has, and scores what it had not
            for d in os.listdir(os.path.join(self.work_dir, sub)):
                names = [f for f in os.listdir(os.path.join(self.work_dir, sub, d)) if f.endswith(".dcm")]
                self._seen.update(f[:-4] for f in names)
                if sub == "incoming" and names:
                    self._last[d] = 0.0

    # --- receiving ---
    def _study_token(self, study_uid: str) -> str:
        return "s" + keyed_pseudonym("study:" + study_uid, self.key)

    def _set_aside(self, ds, reason: str) -> None:
        token = file_token("received:" + str(ds.get("SOPInstanceUID", "")) + str(time.time()), self.key)
        path = os.path.join(self.work_dir, "set_aside", token + ".dcm")
        try:
            ds.save_as(path, enforce_file_format=False)
        except Exception:
            path = ""
        report = os.path.join(self.work_dir, "set_aside.csv")
        new = not os.path.exists(report)
        with self._lock, open(report, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["file", "reason"])
            w.writerow([os.path.basename(path) or token, reason])
        logger.warning("received object set aside: %s", reason)

    def _on_store(self, event):
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as e:  # undecodable dataset: answered, nothing to keep
            logger.warning("received dataset undecodable (%s)", type(e).__name__)
            return 0x0000
        with self._lock:
            self.received += 1
        reason = ""
        try:
            reason = _is_xray_image(ds)
        except Exception as e:
            reason = f"unreadable ({type(e).__name__})"
        if reason:
            self._set_aside(ds, reason)
            return 0x0000  # answered: the sender must not retry a file we will never score
        uid = str(ds.SOPInstanceUID)  # (a valid UID: checked above, so it is safe as a file name)
        with self._lock:
            if uid in self._seen or uid in self._pending:
                self.duplicates += 1
                return 0x0000
            self._pending.add(uid)
        token = self._study_token(str(ds.StudyInstanceUID))
        folder = os.path.join(self.work_dir, "incoming", token)
        try:
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{uid}.tmp")
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, os.path.join(folder, uid + ".dcm"))  # never a torn file under the final name
        except Exception as e:  # not kept: answered with a failure, so the sender sends it again
            logger.error("received instance not stored (%s)", type(e).__name__)
            with self._lock:
                self._pending.discard(uid)
            return 0xA700  # out of resources
        with self._lock:
            self._pending.discard(uid)
            self._seen.add(uid)
            self._last[token] = time.time()
        return 0x0000

    # --- scoring and answering ---
    def _score(self, token: str) -> None:
        """Score the instances of study ``token`` received so far (moved to a batch folder first: an instance
        that arrives meanwhile waits for the next batch, so nothing is scored twice), send the results, and file
        the instances under ``scored/``. A failure puts them back and the study is tried again later."""
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
            run_bundle(self.bundle, self.configs + ["inference.yaml"], workflow_type="infer", **settings)
            with open(os.path.join(out, "manifest.csv")) as f:
                rows = list(csv.DictReader(f))
            files = [os.path.join(out, r["path"]) for r in rows if r["path"]]
            record["not_written"] = sum(1 for r in rows if r["error"])
        except Exception as e:
            for f in names:  # back where they came from: the study is tried again
                os.makedirs(incoming, exist_ok=True)
                os.replace(os.path.join(batch, f), os.path.join(incoming, f))
            shutil.rmtree(batch, ignore_errors=True)
            self._failures[token] = self._failures.get(token, 0) + 1
            record["error"] = type(e).__name__
            if self._failures[token] < 3:
                with self._lock:
                    self._last[token] = time.time() + 30.0 * self._failures[token]
            logger.error("study %s not scored (%s), attempt %d", token, type(e).__name__, self._failures[token])
            self.scored.append(record)
            return
        done = os.path.join(self.work_dir, "scored", token)
        os.makedirs(done, exist_ok=True)
        for f in names:
            os.replace(os.path.join(batch, f), os.path.join(done, f))
        shutil.rmtree(batch, ignore_errors=True)
        for p, reason in send_files(files, self.forward, self.ae_title).items():
            if reason:
                self.retry.add(p, self.forward, reason)
                record["kept_for_retry"] += 1
            else:
                record["sent"] += 1
        self.scored.append(record)
        logger.info("study %s: %d images scored, %d results sent, %d kept for retry, %d not written", token,
                    record["images"], record["sent"], record["kept_for_retry"], record["not_written"])

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
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

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        from pynetdicom import ALL_TRANSFER_SYNTAXES

        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:  # every storage class, in every transfer syntax (a PACS sends
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)  # what it stored)
        ae.add_supported_context(Verification)
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self._worker = threading.Thread(target=self._loop, name="cutremain-listener", daemon=True)
        self._worker.start()
        logger.info("listening as %s on %s:%d, results to %s", self.ae_title, self.host, self.port, self.forward)

    def idle(self) -> bool:
        with self._lock:
            return not self._last

    def stop(self) -> None:
        if self._server is not None:  # no new instance first; then the scoring thread ends (what it has not
            self._server.shutdown()  # scored stays in incoming/ and is scored when the node starts again)
        self._stop.set()
        if self._worker is not None:
            self._worker.join()

    def report(self) -> dict:
        return {"received": self.received, "duplicates": self.duplicates, "studies": self.scored,
                "pending_retry": self.retry.pending()}


def send_folder(folder: str, dest: Destination, calling_ae: str = "CUTREMAIN") -> dict[str, str]:
    """The objects of ``folder``'s ``manifest.csv`` (a ``--dicom-out`` folder), else every file under it, to
    ``dest``; ``{relative path: reason}`` of the ones not sent."""
    manifest = os.path.join(folder, "manifest.csv")
    if os.path.exists(manifest):
        with open(manifest) as f:
            paths = [os.path.join(folder, r["path"]) for r in csv.DictReader(f) if r.get("path")]
    else:
        paths = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in sorted(fs)
                 if not f.endswith((".json", ".csv", ".tmp"))]
    return {os.path.relpath(p, folder): r for p, r in send_files(paths, dest, calling_ae).items() if r}
