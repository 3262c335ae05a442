"""DICOMweb in (issue 29): ``cutremain watch`` polls a server's QIDO-RS for new DX / CR studies, retrieves their
new instances with WADO-RS, scores each study through the bundle (the listener's path: a separate scoring process,
``inference.yaml`` with ``dicom_out``) and stores the results with STOW-RS.

* **Neither missed nor scored twice across a restart.** The watermark (the latest StudyDate seen, never later
  than today) is kept in ``watch_state.json`` (written atomically; no identifier in it; an unreadable file falls
  back to today) and each poll asks for studies from ``lookback_days`` before it on, so a study filed late with an
  earlier StudyDate is still found; studies with no StudyDate are looked for every ``undated_every`` polls. Which
  instances are already had is known from the work folder (files named by SOP Instance UID under ``incoming/``,
  ``scored/``, ``set_aside/``) and the ledger of handled instances (``handled_uids.txt``: scored, set aside,
  quarantined), so an instance is retrieved once, and a batch cut short by a stop is put back and scored when the
  watcher starts again.
* **A study is scored whole.** Retrievals run in parallel; the studies a poll round filed become due only once
  the round has finished (a round that fails holds them until one completes), so a study is never split across
  series by scoring part of it.
* **Results are never lost.** They go through the outbox of :class:`~cutremain_monai.pacs.node.RetryQueue`:
  a server that is down gets them, with backoff, when it is up again.
* **A poll costs one search per modality when nothing changed.** The study search asks for
  NumberOfStudyRelatedInstances; a study whose count is the one its last complete listing saw is not listed again
  (its series and instances), so a seven-day window of thousands of studies is not walked every 30 seconds. A
  server that does not return the count (or refuses ``includefield`` with 400) gets every study listed, as
  before. Every ``relist_every`` polls (and the first after a start) all studies are listed whatever their count:
  an instance deleted and another filed in its place between two polls leaves the count unchanged, and is found
  by that sweep (by default within 20 polls, 10 minutes at 30 s).
* :func:`fetch_new` is also ``cutremain ingest --dicomweb``'s query and retrieve.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pydicom

from cutremain_monai.pacs.dicomweb import DicomWebClient, DicomWebError, DicomWebServer, dicom_json_value
from cutremain_monai.io.paths import valid_uid
from cutremain_monai.io.atomic import write_json_atomic
from cutremain_monai.pacs.node import StudyNode, is_xray_image

__all__ = ["Watcher", "fetch_new", "retrieve_to_folder"]

logger = logging.getLogger(__name__)


def _today() -> str:
    return datetime.date.today().strftime("%Y%m%d")


def fetch_new(client: DicomWebClient, modalities: Sequence[str], since: str | None, known: Callable[[str], bool],
              take: Callable[[bytes, str], None], study_modalities: Sequence[str] | None = None,
              undated: bool = False, listed: dict[str, int] | None = None) -> tuple[int, str | None]:
    """QIDO-RS the studies with a series of ``modalities`` from StudyDate ``since`` (``YYYYMMDD``, inclusive; None:
    all), and WADO-RS every instance of those series that ``known(sop_uid)`` does not know, handing its Part 10
    bytes and the SOP Instance UID it was asked by to ``take(raw, sop_uid)`` (``max_concurrent`` retrievals at
    once). ``undated``: also the studies that have no StudyDate (a date range never matches them). Returns
    (instances retrieved, the latest StudyDate seen). ``study_modalities``: the modalities a study is searched by
    (default ``modalities``). ``listed``: study UID -> its NumberOfStudyRelatedInstances when it was last listed
    completely; a study whose count is unchanged is not listed again, and the counts of this round are recorded
    once every retrieval of the round has succeeded (a round that fails records none)."""
    studies: dict[str, str] = {}
    counts: dict[str, int] = {}
    for modality in study_modalities or modalities:
        queries = [{"ModalitiesInStudy": modality, **({"StudyDate": f"{since}-"} if since else {})}]
        if undated and since:
            queries.append({"ModalitiesInStudy": modality})
        for n, params in enumerate(queries):
            for item in _search_studies(client, params, with_count=listed is not None):
                uid = dicom_json_value(item, "StudyInstanceUID")
                date = str(dicom_json_value(item, "StudyDate") or "")
                if uid and (n == 0 or not date):
                    studies[uid] = date
                    count = _as_count(dicom_json_value(item, "NumberOfStudyRelatedInstances"))
                    if count is not None:
                        counts[uid] = count
    wanted = []
    for study in studies:
        if listed is not None and study in counts and listed.get(study) == counts[study]:
            continue  # nothing filed in it since its last complete listing
        for series in client.search(f"studies/{study}/series"):
            if str(dicom_json_value(series, "Modality") or "") not in modalities:
                continue  # (our own SR / SC / PR, stored back into the study, are not images to score)
            series_uid = dicom_json_value(series, "SeriesInstanceUID")
            for inst in client.search(f"studies/{study}/series/{series_uid}/instances"):
                sop = dicom_json_value(inst, "SOPInstanceUID")
                if sop and not known(sop):
                    wanted.append((study, series_uid, sop))

    def one(ref):
        take(client.retrieve_instance(*ref), ref[2])

    with ThreadPoolExecutor(client.server.max_concurrent) as pool:
        for job in [pool.submit(one, ref) for ref in wanted]:
            job.result()
    if listed is not None:  # the studies of this window only (the cache does not grow without bound)
        listed.clear()
        listed.update(counts)
    latest = max((d for d in studies.values() if d), default=None)
    return len(wanted), latest


_COUNT_TAG = "00201208"  # NumberOfStudyRelatedInstances


def _search_studies(client: DicomWebClient, params: dict, with_count: bool) -> list[dict]:
    """QIDO-RS studies, asking for their instance count when ``with_count``; a server that refuses the
    ``includefield`` (HTTP 400) is asked again without it."""
    if not with_count:
        return client.search("studies", params)
    try:
        return client.search("studies", {**params, "includefield": _COUNT_TAG})
    except DicomWebError as e:
        if e.status != 400:
            raise
        return client.search("studies", params)


def _as_count(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def retrieve_to_folder(server: DicomWebServer, folder: str, modalities: Sequence[str] = ("DX", "CR"),
                       since: str | None = None, study_modalities: Sequence[str] | None = None) -> int:
    """Query and retrieve into ``folder`` (``cutremain ingest --dicomweb``): every instance of the series of
    ``modalities`` in the studies holding a series of ``study_modalities`` (default: ``modalities``) from StudyDate
    ``since``, as ``<SOP Instance UID>.dcm`` (no patient identifier in a name); files already there are not
    retrieved again. Returns how many were retrieved."""
    os.makedirs(folder, exist_ok=True)

    def known(uid: str) -> bool:
        return os.path.exists(os.path.join(folder, f"{uid}.dcm"))

    def take(raw: bytes, _sop: str) -> None:
        ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        uid = str(ds.SOPInstanceUID)
        if not valid_uid(uid):
            raise DicomWebError("a retrieved instance has no valid SOP Instance UID")
        tmp = os.path.join(folder, f".{uid}.tmp")
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, os.path.join(folder, f"{uid}.dcm"))

    client = DicomWebClient(server)
    try:
        count, _ = fetch_new(client, tuple(modalities), since, known, take,
                             study_modalities=tuple(study_modalities or modalities))
    finally:
        client.close()
    return count


class Watcher(StudyNode):
    """Poll ``source`` every ``poll_seconds`` and score what is new (see the module).

    Args:
        source: the DICOMweb server to watch; forward: where results go (default: ``source``, by STOW-RS).
        modalities: the series modalities scored (default DX and CR).
        since: the watermark (``YYYYMMDD``) when there is no state yet (default: today).
        lookback_days: each poll looks at studies from this many days before the watermark on (a study filed
            late, with an earlier StudyDate, is still found; what is had already is not retrieved again).
        undated_every: every this many polls (and the first), studies without a StudyDate are looked for too
            (0: never).
        relist_every: every this many polls (and the first), every study in the window is listed again whatever
            its instance count (see the module; 0: only the first poll).
        Others: :class:`~cutremain_monai.pacs.node.StudyNode`.
    """
    def __init__(self, source: DicomWebServer, bundle: str, work_dir: str, forward=None,
                 modalities: Sequence[str] = ("DX", "CR"), poll_seconds: float = 30.0, since: str | None = None,
                 lookback_days: float = 7.0, undated_every: int = 20, relist_every: int = 20, **kwargs):
        kwargs.setdefault("quiet_seconds", 0.0)
        self._held: set[str] = set()  # studies filed by a round not finished yet (see _arrived)
        super().__init__(bundle, work_dir, forward or source, **kwargs)
        with self._lock:  # what a stopped watcher had filed waits for a complete round too
            self._held.update(self._last)
            self._last.clear()
        self.source = source
        self.modalities = tuple(modalities)
        self.poll_seconds = float(poll_seconds)
        self.lookback_days = float(lookback_days)
        if self.lookback_days < 0:
            raise ValueError(f"lookback_days must be at least 0, got {lookback_days}")
        self.undated_every = int(undated_every)
        self.relist_every = int(relist_every)
        self.state_path = os.path.join(self.work_dir, "watch_state.json")
        self.state = {"study_date": min(since or _today(), _today())}
        if os.path.exists(self.state_path):
            try:
                with open(self.state_path) as f:
                    saved = json.load(f)
                date = str(saved["study_date"])
                datetime.datetime.strptime(date, "%Y%m%d")
                self.state["study_date"] = min(date, _today())
            except (OSError, ValueError, KeyError, TypeError) as e:  # the lookback window from today
                logger.warning("watch: %s unreadable (%s): looking back %g days from today", self.state_path,
                               type(e).__name__, self.lookback_days)
                self.state["study_date"] = _today()
        self.polls = 0
        self.last_error = ""
        self._poll_thread = None
        self._client = None
        self._listed: dict[str, int] = {}  # study -> instance count at its last complete listing (fetch_new)
        self._sweep_due = True  # until a round has listed every study

    def _save_state(self) -> None:
        write_json_atomic(self.state_path, self.state)

    def _arrived(self, token: str) -> None:
        self._held.add(token)  # due once the round that retrieved it has finished (never half a study)

    def _release(self) -> None:
        now = time.time()
        with self._lock:
            for token in self._held:
                self._last[token] = now
            self._held.clear()

    def since(self) -> str:
        """The first StudyDate the next poll asks for: the watermark less ``lookback_days``."""
        mark = datetime.datetime.strptime(str(self.state["study_date"]), "%Y%m%d")
        return (mark - datetime.timedelta(days=self.lookback_days)).strftime("%Y%m%d")

    def _take(self, raw: bytes, sop: str) -> None:
        try:
            ds = pydicom.dcmread(io.BytesIO(raw))
            reason = is_xray_image(ds)
        except Exception as e:
            self.quarantine(raw, f"retrieved instance undecodable ({type(e).__name__})", sop_uid=sop)
            return
        with self._lock:
            self.received += 1
        if reason:
            self.set_aside(ds, reason, sop_uid=sop)
            return
        filed = self.file_instance(ds)
        if filed and filed != "duplicate":
            raise OSError(f"retrieved instance {filed}")

    def poll(self) -> int:
        """One QIDO-RS / WADO-RS round: the new instances filed, their studies due once the round has finished;
        the watermark moves only when the round completed, and never past today."""
        if self._client is None:
            self._client = DicomWebClient(self.source)
        undated = self.undated_every > 0 and self.polls % self.undated_every == 0
        sweep = self._sweep_due or (self.relist_every > 0 and self.polls % self.relist_every == 0)
        # a copy, filled by the round and put in place when it completes (a failed round keeps the one before)
        listed = {} if sweep else dict(self._listed)
        count, latest = fetch_new(self._client, self.modalities, self.since(), self.known, self._take,
                                  undated=undated, listed=listed)
        self._listed, self._sweep_due = listed, False
        self._release()
        latest = min(latest, _today()) if latest else None
        if latest and latest > str(self.state["study_date"]):
            self.state["study_date"] = latest
        self.polls += 1
        self._save_state()
        if count:
            logger.info("watch: %d new instances from %s", count, self.source)
        return count

    def _poll_loop(self) -> None:
        while True:
            try:
                self.poll()
                self.last_error = ""
            except Exception as e:  # the server down, a wrong password, anything: said, and polled again
                # (a DicomWebError's text is ours: the server and the HTTP status; any other error is named by its
                # type only, its text can quote what was received)
                why = str(e) if isinstance(e, DicomWebError) else type(e).__name__
                if why != self.last_error:
                    logger.error("watch: poll failed: %s", why)
                self.last_error = why
            if self._stop.wait(self.poll_seconds):
                return

    def start(self) -> None:
        self.start_scoring()
        self._poll_thread = threading.Thread(target=self._poll_loop, name="cutremain-watch", daemon=True)
        self._poll_thread.start()
        logger.info("watching %s (%s), results to %s", self.source, "/".join(self.modalities), self.forward)

    def stop(self) -> None:
        self._stop.set()
        if self._poll_thread is not None:
            self._poll_thread.join()
        self.stop_scoring()
        if self._client is not None:
            self._client.close()

    def report(self) -> dict:
        return {**super().report(), "polls": self.polls, "study_date": self.state.get("study_date"),
                "last_error": self.last_error}
