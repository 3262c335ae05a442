"""``watch`` against an archive in memory (the Orthanc round trip is in test_dicomweb.py): the lookback window (a
late study with an earlier date, a future date, a study without a date), the ledger of handled instances (set
aside and quarantined ones are not retrieved again, across a restart), studies due only once the round that
retrieved them has finished, a poll loop that survives any error and names it by its type only, and an unreadable
state file."""

import datetime
import io
import json
import logging
import os
import threading
import time

import pydicom
import pytest

from cutremain_monai.pacs.dicomweb import DicomWebError, DicomWebServer
from cutremain_monai.pacs.watch import Watcher
from tests.conftest import SAMPLES

TODAY = datetime.date.today().strftime("%Y%m%d")

_TAGS = {"StudyInstanceUID": "0020000D", "StudyDate": "00080020", "SeriesInstanceUID": "0020000E",
         "Modality": "00080060", "SOPInstanceUID": "00080018", "NumberOfStudyRelatedInstances": "00201208"}


@pytest.fixture
def frozen_today(monkeypatch):
    """The watcher's clock pinned to TODAY (module import time): a test that runs across midnight (CI did) would
    otherwise compare the watermark with yesterday."""
    monkeypatch.setattr("cutremain_monai.pacs.watch._today", lambda: TODAY)
    return TODAY


def _json(**values) -> dict:
    return {_TAGS[k]: ({"vr": "UI", "Value": [v]} if v else {"vr": "UI"}) for k, v in values.items() if v is not ...}


def _dx(study: str, date: str | None) -> tuple[str, bytes]:
    ds = pydicom.dcmread(os.path.join(SAMPLES, "clavicle", "clavicle_005.dcm"))
    ds.StudyInstanceUID = study
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    if date:
        ds.StudyDate = date
    else:
        del ds.StudyDate
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return str(ds.SOPInstanceUID), buf.getvalue()


class Archive:
    """A QIDO-RS / WADO-RS server in memory, with the search semantics of a StudyDate range (a study without a
    date never matches one); ``fail``: raised by the next search; ``on_retrieve(sop)``: called at each retrieval."""

    def __init__(self):
        self.server = DicomWebServer("http://127.0.0.1:9/dicom-web", max_concurrent=1)
        self.instances: list[dict] = []
        self.study_queries: list[dict] = []
        self.retrieved: list[str] = []
        self.fail = None
        self.on_retrieve = None
        self.counts = False  # answers NumberOfStudyRelatedInstances when asked (includefield)
        self.refuse_includefield = False  # answers 400 to a search with includefield
        self.listings: list[str] = []  # the series searches (one per study listed)

    def add(self, date: str | None, n: int = 1, raw: bytes | None = None, study: str | None = None) -> list[str]:
        study = study or pydicom.uid.generate_uid()
        sops = []
        for _ in range(n):
            sop, data = _dx(study, date)
            if raw is not None:
                sop, data = pydicom.uid.generate_uid(), raw
            self.instances.append({"study": study, "date": date or "", "series": study + ".1", "sop": sop, "raw": data})
            sops.append(sop)
        return sops

    def search(self, path: str, params=None) -> list[dict]:
        if self.fail is not None:
            e, self.fail = self.fail, None
            raise e
        parts = path.split("/")
        if path == "studies":
            if self.refuse_includefield and "includefield" in params:
                raise DicomWebError("http://127.0.0.1:9/dicom-web: HTTP 400 Bad Request", status=400)
            self.study_queries.append(dict(params))
            since = (params.get("StudyDate") or "").rstrip("-")
            found = {i["study"]: i["date"] for i in self.instances if not since or (i["date"] and i["date"] >= since)}
            asked = self.counts and "00201208" in str(params.get("includefield", ""))
            return [_json(StudyInstanceUID=s, StudyDate=d,
                          NumberOfStudyRelatedInstances=sum(i["study"] == s for i in self.instances) if asked else ...)
                    for s, d in found.items()]
        if len(parts) == 3:
            self.listings.append(parts[1])
            return [_json(SeriesInstanceUID=s, Modality="DX") for s in {i["series"] for i in self.instances
                                                                         if i["study"] == parts[1]}]
        return [_json(SOPInstanceUID=i["sop"]) for i in self.instances if i["series"] == parts[3]]

    def retrieve_instance(self, study: str, series: str, sop: str) -> bytes:
        self.retrieved.append(sop)
        if self.on_retrieve is not None:
            self.on_retrieve(sop)
        return next(i["raw"] for i in self.instances if i["sop"] == sop)

    def close(self):
        pass


def _watcher(tmp_path, archive, **kwargs) -> Watcher:
    w = Watcher(archive.server, str(tmp_path), str(tmp_path / "work"), **kwargs)
    w._client = archive
    return w


def _days_before(date: str, days: int) -> str:
    return (datetime.datetime.strptime(date, "%Y%m%d") - datetime.timedelta(days=days)).strftime("%Y%m%d")


def test_lookback_window_late_future_and_undated_studies(tmp_path, frozen_today):
    archive = Archive()
    late = archive.add(_days_before(TODAY, 3))  # filed late, dated before the watermark
    old = archive.add(_days_before(TODAY, 30))  # older than the window
    future = archive.add("29991231")  # a clock gone wrong
    undated = archive.add(None)  # no StudyDate: a date range never matches it
    w = _watcher(tmp_path, archive, since=TODAY, lookback_days=7, undated_every=3)
    assert w.poll() == 3 and sorted(archive.retrieved) == sorted(late + future + undated)
    assert archive.study_queries[0]["StudyDate"] == _days_before(TODAY, 7) + "-"  # the watermark less 7 days
    assert [q for q in archive.study_queries if "StudyDate" not in q] != []  # the undated ones, on the first poll
    assert w.state["study_date"] == TODAY  # the future date does not move it past today
    assert not w.known(old[0])
    archive.add(_days_before(TODAY, 3), study=archive.instances[0]["study"])  # one more image of the late study
    assert w.poll() == 1  # found again through the lookback; what was had is not retrieved twice
    assert archive.study_queries[-1]["StudyDate"] == _days_before(TODAY, 7) + "-"  # (never moved past today)
    assert json.load(open(tmp_path / "work" / "watch_state.json")) == {"study_date": TODAY}


def test_set_aside_and_quarantined_instances_are_not_retrieved_again(tmp_path):
    archive = Archive()
    with open(os.path.join(SAMPLES, "clavicle", "clavicle_000_gsps.dcm"), "rb") as f:
        pr = archive.add("20260105", raw=f.read())  # a presentation state in a DX series: set aside
    junk = archive.add("20260105", raw=b"\x00" * 64)  # not DICOM: quarantined
    w = _watcher(tmp_path, archive, since="20260106")
    assert w.poll() == 2
    assert "not a projection X-ray" in open(tmp_path / "work" / "set_aside.csv").read()
    assert "undecodable" in open(tmp_path / "work" / "quarantine.csv").read()
    assert w.poll() == 0 and len(archive.retrieved) == 2
    again = _watcher(tmp_path, archive, since="20260106")  # restarted: the ledger remembers them
    assert again.poll() == 0 and len(archive.retrieved) == 2
    assert set(open(tmp_path / "work" / "handled_uids.txt").read().split()) == set(pr + junk)


def test_a_study_is_due_only_after_the_round_that_retrieved_it(tmp_path):
    archive = Archive()
    archive.add("20260105", n=3)
    w = _watcher(tmp_path, archive, since="20260106")
    idle_during = []
    archive.on_retrieve = lambda sop: idle_during.append(w.idle())
    assert w.poll() == 3
    assert idle_during == [True, True, True] and not w.idle()  # nothing due while the round ran; due after it
    # a round that fails half-way holds what it filed until a round completes
    w2 = _watcher(tmp_path / "b", archive, since="20260106")

    def fail_second(sop, calls=[]):
        calls.append(sop)
        if len(calls) == 2:
            raise ConnectionError("down")

    archive.on_retrieve = fail_second
    with pytest.raises(ConnectionError):
        w2.poll()
    assert w2.idle()  # the others filed, the study not due
    archive.on_retrieve = None
    assert w2.poll() == 1 and not w2.idle()


def test_the_poll_loop_survives_any_error_and_names_only_its_type(tmp_path, caplog):
    archive = Archive()
    w = _watcher(tmp_path, archive, since="20260106", poll_seconds=0.02)
    archive.fail = ValueError("unexpected value in (0010,0010): DOE^JANE")
    thread = threading.Thread(target=w._poll_loop, daemon=True)
    with caplog.at_level(logging.DEBUG):
        thread.start()
        t = time.time()
        while w.polls < 2 and time.time() - t < 30:
            time.sleep(0.02)
        w._stop.set()
        thread.join(10)
    assert w.polls >= 2 and w.last_error == ""  # polled on after the error
    assert "poll failed: ValueError" in caplog.text and "DOE" not in caplog.text


def test_an_unreadable_state_file_falls_back_to_the_lookback_window(tmp_path, frozen_today):
    os.makedirs(tmp_path / "work")
    (tmp_path / "work" / "watch_state.json").write_text('{"study_da')  # torn
    archive = Archive()
    w = _watcher(tmp_path, archive, lookback_days=3)
    assert w.state["study_date"] == TODAY and w.since() == _days_before(TODAY, 3)
    w.poll()
    assert json.load(open(tmp_path / "work" / "watch_state.json")) == {"study_date": TODAY}


@pytest.mark.parametrize("server", ["counts", "no counts", "refuses includefield"])
def test_a_study_is_listed_again_only_when_its_instance_count_changed(tmp_path, server):
    """With NumberOfStudyRelatedInstances, a poll that finds nothing new costs the study searches only; a study
    that gains an instance is listed again (and only it); the periodic full sweep lists all; a round that fails
    records no count. A server without the count, or one that answers 400 to includefield, gets every study
    listed at every poll (the behaviour before)."""
    archive = Archive()
    archive.counts = server == "counts"
    archive.refuse_includefield = server == "refuses includefield"
    counts = archive.counts
    day = _days_before(TODAY, 1)
    a, b = archive.add(day, n=2), archive.add(day)
    study_a, study_b = archive.instances[0]["study"], archive.instances[2]["study"]
    w = _watcher(tmp_path, archive, since=TODAY, relist_every=4)
    assert w.poll() == 3 and sorted(archive.listings) == sorted([study_a, study_b])  # first poll: all listed
    del archive.listings[:]
    assert w.poll() == 0
    assert archive.listings == ([] if counts else [study_a, study_b])  # nothing new: no study walked
    new = archive.add(day, study=study_b)
    del archive.listings[:]
    assert w.poll() == 1 and archive.retrieved[-1] == new[0]
    assert archive.listings == ([study_b] if counts else [study_a, study_b])  # only the study that changed
    later = archive.add(day, study=study_a)
    archive.on_retrieve = lambda sop: (_ for _ in ()).throw(OSError("connection reset"))
    with pytest.raises(OSError):
        w.poll()  # the round fails while retrieving: study A's new count is not recorded
    archive.on_retrieve = None
    del archive.listings[:]
    assert w.poll() == 1 and archive.retrieved[-1] == later[0]  # so A is listed again and its image retrieved
    assert study_a in archive.listings
    del archive.listings[:]
    assert w.polls == 4 and w.poll() == 0  # the 5th poll (index 4, relist_every=4): the full sweep lists all
    assert sorted(archive.listings) == sorted([study_a, study_b])
    assert sorted(archive.retrieved[:3]) == sorted(a + b)
    assert w._listed == ({study_a: 3, study_b: 2} if counts else {})
    # an image deleted and another filed in its place: the count is unchanged, so the next sweep finds it
    gone = archive.instances.pop(0)["sop"]
    swapped = archive.add(day, study=study_a)
    assert w.poll() == (0 if counts else 1) and gone not in swapped
    w.polls = 8  # (the next sweep)
    assert w.poll() == (1 if counts else 0) and archive.retrieved[-1] == swapped[0]
    archive.instances = [i for i in archive.instances if i["study"] != study_b]  # a study left the window:
    w.poll()
    assert study_b not in w._listed  # its count is not kept (the cache holds the window's studies only)
