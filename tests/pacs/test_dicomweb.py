"""DICOMweb against a real Orthanc with its DICOMweb plugin (issue 29): STOW-RS of results (``cutremain send
--stow``), a wrong password, the server down and up again (nothing lost, nothing doubled), and ``watch``: QIDO-RS /
WADO-RS of new studies, a restart in the middle of a batch, a scoring process that crashes (the node goes on)."""

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pydicom
import pytest

from cutremain_monai.cli import main as cli_main
from cutremain_monai.pacs.dicomweb import DicomWebServer, stow_files
from cutremain_monai.pacs.node import RetryQueue
from cutremain_monai.pacs.watch import Watcher
from tests.conftest import ROOT, SAMPLES
from tests.pacs.fake_scoring import fake_score
from tests.pacs.orthanc_server import Orthanc, wait_for

USERS = {"cutremain": "s3cret-pw"}


def studies(tmp_path, n_studies: int, per_study: int, crash: int | None = None) -> list[str]:
    """``n_studies`` DX studies of ``per_study`` images (new UIDs), written under tmp_path/upload; study ``crash``
    described CRASH."""
    sources = sorted(p for p in glob.glob(os.path.join(SAMPLES, "clavicle", "*.dcm")) if not p.endswith("_gsps.dcm"))
    os.makedirs(tmp_path / "upload", exist_ok=True)
    out = []
    for s in range(n_studies):
        study = pydicom.uid.generate_uid()
        for i in range(per_study):
            ds = pydicom.dcmread(sources[(s * per_study + i) % len(sources)])
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, pydicom.uid.generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            ds.StudyDate = "20260102"
            ds.StudyDescription = "CRASH" if s == crash else "test"
            out.append(str(tmp_path / "upload" / f"{ds.SOPInstanceUID}.dcm"))
            ds.save_as(out[-1])
    return out


@pytest.fixture
def orthanc(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTREMAIN_TEST_AUTH", "cutremain:s3cret-pw")
    os.makedirs(tmp_path / "orthanc")
    server = Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS)
    yield server
    server.stop()


def test_stow_send_wrong_password_and_server_down_then_up(tmp_path, orthanc, monkeypatch, capsys, caplog):
    files = studies(tmp_path, 2, 3)
    folder = tmp_path / "upload"
    args = ["send", str(folder), "--stow", orthanc.dicomweb_url, "--auth-env", "CUTREMAIN_TEST_AUTH"]
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"not_sent": 0, "warnings": 0}
    uids = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in files)
    assert sorted(orthanc.sop_uids()) == uids
    assert cli_main(args) == 0 and sorted(orthanc.sop_uids()) == uids  # sent again: stored once
    # a wrong password: a clear error per file, no secret anywhere
    monkeypatch.setenv("CUTREMAIN_TEST_AUTH", "cutremain:wrong-pw")
    with caplog.at_level(logging.DEBUG):
        assert cli_main(args) == 1
    out = capsys.readouterr().out
    assert out.count("HTTP 401 Unauthorized") == len(files), out
    assert "wrong-pw" not in out + caplog.text and "s3cret" not in out + caplog.text
    with pytest.raises(ValueError, match="credentials in a DICOMweb URL are not accepted"):
        DicomWebServer(orthanc.dicomweb_url.replace("http://", "http://u:p@"))
    monkeypatch.setenv("CUTREMAIN_TEST_AUTH", "cutremain:s3cret-pw")
    # the server down: kept in the outbox with the reason, retried with backoff, delivered once when it is up
    more = studies(tmp_path / "more", 1, 3)
    server = DicomWebServer(orthanc.dicomweb_url, auth_env="CUTREMAIN_TEST_AUTH", timeout=5)
    queue = RetryQueue(str(tmp_path / "retry"), base_delay=0.0, servers=[server])
    orthanc.stop()
    kept = queue.enqueue(more, server)
    assert all("failed (ConnectionError)" in r for r in queue.send_now(kept, server).values())
    assert [i["attempts"] for i in queue.pending()] == [1, 1, 1]
    assert {i["destination"]["dicomweb"] for i in queue.pending()} == {orthanc.dicomweb_url}  # the URL, no secret
    assert queue.retry_due() == 0 and [i["attempts"] for i in queue.pending()] == [2, 2, 2]
    orthanc.start()
    assert queue.retry_due() == 3 and queue.pending() == []
    assert queue.retry_due() == 0  # nothing sent twice
    assert sorted(orthanc.sop_uids()) == sorted(uids + [str(pydicom.dcmread(p).SOPInstanceUID) for p in more])
    # the answer is read per instance: an object without a Study Instance UID is refused with its own failure
    # reason (FailedSOPSequence); Orthanc then answers 400 for the whole request, and the good instance is told
    # so and goes through when sent again alone
    bad = pydicom.dcmread(more[0])
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    del bad.StudyInstanceUID
    bad.save_as(str(tmp_path / "bad.dcm"))
    good = studies(tmp_path / "good", 1, 1)[0]
    info: dict = {}
    result = stow_files([str(tmp_path / "bad.dcm"), good], server, info=info)
    assert result == {str(tmp_path / "bad.dcm"): "STOW-RS failure reason 0xC000", good: ""}, result
    assert info == {str(tmp_path / "bad.dcm"): {"permanent": True}}
    assert str(pydicom.dcmread(good).SOPInstanceUID) in orthanc.sop_uids()  # stored, though the answer was 400
    # through the outbox: the good one delivered once, the bad one moved to failed/ with its reason, not retried
    again = studies(tmp_path / "again", 1, 1)[0]
    kept = queue.enqueue([str(tmp_path / "bad.dcm"), again], server)
    assert queue.send_now(kept, server)[kept[1]] == ""
    assert queue.pending() == [] and [(f["file"], f["reason"]) for f in queue.failed()] == [
        ("bad.dcm", "STOW-RS failure reason 0xC000")]
    assert queue.retry_due() == 0


WATCH_SCRIPT = """
import json, sys, time
from cutremain_monai.pacs.dicomweb import DicomWebServer
from cutremain_monai.pacs.watch import Watcher
from tests.pacs.fake_scoring import fake_score
a = json.loads(sys.argv[1])
w = Watcher(DicomWebServer(a["url"], auth_env="CUTREMAIN_TEST_AUTH"), a["bundle"], a["work"], since="20260101",
            poll_seconds=0.5, overrides={"gate": a["gate"], "block_after": 1}, score_fn=fake_score)
w.start()
time.sleep(600)
"""


def _sc_sources(orthanc) -> list[str]:
    """The source SOP Instance UIDs of the Secondary Captures Orthanc holds (one per result)."""
    out = []
    for inst in orthanc.get("/instances?expand"):
        tags = orthanc.get(f"/instances/{inst['ID']}/tags?simplify")
        if tags.get("Modality") == "OT":
            out.append(tags["SourceImageSequence"][0]["ReferencedSOPInstanceUID"])
    return out


def test_watch_restart_crash_and_outage(tmp_path, orthanc):
    server = DicomWebServer(orthanc.dicomweb_url, auth_env="CUTREMAIN_TEST_AUTH", timeout=5)
    files = studies(tmp_path, 3, 2)
    assert all(r == "" for r in stow_files(files, server).values())
    images = {str(pydicom.dcmread(p).SOPInstanceUID) for p in files}
    work, gate = tmp_path / "watch", tmp_path / "gate"
    gate.mkdir()
    bundle = os.path.join(ROOT, "bundles", "clavicle_fracture")
    # a watcher in its own process; its second study blocks in scoring (the gate), and the watcher is stopped hard
    # there (SIGKILL, its scoring process with it): one study delivered, one cut short in batches/, one waiting
    proc = subprocess.Popen([sys.executable, "-c", WATCH_SCRIPT, json.dumps(
        {"url": orthanc.dicomweb_url, "bundle": bundle, "work": str(work), "gate": str(gate)})], cwd=ROOT,
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (gate / "blocked").exists(), 120), "the first watcher never reached its second study"
        assert os.listdir(work / "batches"), "no batch in flight when the watcher was stopped"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = _sc_sources(orthanc)
    assert len(first) == 2 and set(first) < images  # the first study (its results sent before the second began)
    # started again, with a new study whose scoring crashes: what was had is known, what was cut short is put back
    # (scored once: fake_score's UIDs are new at every call, so a second scoring would show as a second result);
    # the crash is retried once, then the study is set aside; the node goes on
    crash = studies(tmp_path / "crash", 1, 2, crash=0)
    assert all(r == "" for r in stow_files(crash, server).values())
    crash_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in crash}
    watcher = Watcher(server, bundle, str(work), since="20260101", poll_seconds=0.5, score_fn=fake_score,
                      retry_base_delay=0.3, study_retry_delay=0.3)
    watcher.start()
    try:
        assert wait_for(lambda: len(_sc_sources(orthanc)) >= len(images) and watcher.idle() and any(
            s.get("set_aside") for s in watcher.scored), 180), (watcher.report(), _sc_sources(orthanc))
        assert sorted(_sc_sources(orthanc)) == sorted(images)  # every image once: none scored twice
        crashed = [s for s in watcher.scored if s.get("error")]
        assert [c["error"] for c in crashed] == ["scoring process killed by SIGSEGV"] * 2
        aside = open(work / "set_aside.csv").read()
        assert "study not scored twice: scoring process killed by SIGSEGV" in aside
        assert sorted(os.listdir(next((work / "set_aside").glob("s*")))) == sorted(u + ".dcm" for u in crash_uids)
        assert watcher.worker.started == 2  # the first, and one after the first crash
        polls = watcher.polls
        assert wait_for(lambda: watcher.polls >= polls + 2, 30)
        assert watcher.received == 2  # the crash study only: the cut-short and waiting ones are not retrieved again
        # Orthanc answers NumberOfStudyRelatedInstances, so studies whose count is unchanged are not walked
        assert len(watcher._listed) == 4 and all(n >= 1 for n in watcher._listed.values()), watcher._listed
        # the server down: a new study is retrieved before, its results wait in the outbox, and arrive once
        late = studies(tmp_path / "late", 1, 2)
        assert all(r == "" for r in stow_files(late, server).values())
        late_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in late}
        assert wait_for(lambda: all(watcher.known(u) for u in late_uids), 60)
        orthanc.stop()
        assert wait_for(lambda: len(watcher.retry.pending()) == 2, 60), watcher.report()
        assert wait_for(lambda: "unreachable" in watcher.last_error, 30)
        orthanc.start()
        assert wait_for(lambda: not watcher.retry.pending(), 60), watcher.report()
        assert watcher.worker.started == 3  # the node served on: a fresh scoring process for the next study
        assert sorted(_sc_sources(orthanc)) == sorted(images | late_uids)  # nothing lost, nothing doubled
    finally:
        watcher.stop()
    state = json.load(open(work / "watch_state.json"))
    assert state == {"study_date": "20260102"}  # the watermark, and nothing that names anyone
    for root, _, names in os.walk(work):
        for name in names:
            assert "SYN-" not in name and "PHANTOM" not in name  # no patient identifier in a file name


def test_ingest_from_dicomweb_leaves_model_output_out(tmp_path, orthanc, capsys):
    """``ingest --dicomweb``: query and retrieve into the folder, then the ingest; our own SR, stored back in the
    study, is not taken as an annotation (it is quarantined with the reason)."""
    from cutremain_monai.io.datalist import load_datalist
    from cutremain_monai.io.sr import Finding, ModelDevice, write_findings_sr

    files = studies(tmp_path, 1, 2)
    write_findings_sr(pydicom.dcmread(files[0], stop_before_pixels=True), [Finding("fracture", 0.9, [1, 1, 9, 9])],
                      ModelDevice("clavicle_fracture", "0.1.0", "model"), str(tmp_path / "sr.dcm"))
    server = DicomWebServer(orthanc.dicomweb_url, auth_env="CUTREMAIN_TEST_AUTH")
    assert all(r == "" for r in stow_files(files + [str(tmp_path / "sr.dcm")], server).values())
    folder, out = tmp_path / "export", tmp_path / "dl.json"
    args = ["ingest", str(folder), "--dicomweb", orthanc.dicomweb_url, "--auth-env", "CUTREMAIN_TEST_AUTH", "--sr",
            "--since", "20260101", "-o", str(out), "--no-progress"]
    assert cli_main(args) == 0
    assert "retrieved 3 new instances" in capsys.readouterr().out
    items = load_datalist(str(out))
    assert len(items) == 2 and all(it["boxes"] == [] and it["label"] == 0 for it in items)
    assert "structured report of model findings" in open(tmp_path / "dl_quarantine.csv").read()
    assert cli_main(args) == 0 and "retrieved 0 new instances" in capsys.readouterr().out  # nothing twice


# --- the answer of a STOW-RS read per instance, and QIDO-RS paging, against a fake session (no server needed) ---

class FakeSession:
    """A ``requests`` session stand-in: ``answer(uids) -> (status, json body, headers)`` for each STOW-RS POST (the
    SOP Instance UIDs it carried); GETs answer ``pages(params)``."""

    def __init__(self, answer=None, pages=None):
        self.answer, self.pages = answer, pages
        self.posts: list[list[str]] = []
        self.gets = 0

    def _response(self, status, body, headers=None):
        import requests

        r = requests.Response()
        r.status_code = status
        r.reason = {200: "OK", 400: "Bad Request", 413: "Payload Too Large", 503: "Service Unavailable"}.get(status)
        r._content = json.dumps(body).encode() if body is not None else b""
        r.headers.update({"Content-Type": "application/dicom+json", **(headers or {})})
        return r

    def post(self, url, data=None, headers=None, timeout=None):
        from cutremain_monai.pacs.dicomweb import parse_multipart

        uids = [str(pydicom.dcmread(__import__("io").BytesIO(p)).SOPInstanceUID)
                for p in parse_multipart(headers["Content-Type"], data)]
        self.posts.append(uids)
        return self._response(*self.answer(uids))

    def get(self, url, params=None, headers=None, timeout=None):
        self.gets += 1
        return self._response(200, self.pages(params))

    def close(self):
        pass


def _stow_answer(stored=(), failed=()):
    sop = lambda uid, code=None, tag="00081197": {"00081155": {"vr": "UI", "Value": [uid]},  # noqa: E731
                                                   **({tag: {"vr": "US", "Value": [code]}} if code else {})}
    body = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [sop(u) for u in stored]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [sop(u, c) for u, c in failed]}
    return body


def _small_files(tmp_path, n):
    out = []
    for i in range(n):
        ds = pydicom.Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.PatientName = "DOE^JANE"
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        out.append(str(tmp_path / f"r{i}.dcm"))
        ds.save_as(out[-1], enforce_file_format=True)
    return out, [str(pydicom.dcmread(p).SOPInstanceUID) for p in out]


def test_stow_answer_per_instance_split_permanent_and_retry_after(tmp_path, monkeypatch, caplog):
    """A 400 with the stored instances listed: those are stored (not sent again), the refused one is a permanent
    failure and goes to failed/; a 413 splits the batch; a 503 with Retry-After is retried no sooner; the
    server's free text (which can echo a patient's name) is never in a reason or the log."""
    paths, uids = _small_files(tmp_path, 4)
    server = DicomWebServer("http://127.0.0.1:9/dicom-web", max_concurrent=1)
    # a mixed batch: Orthanc answers 400 and lists what it stored
    fake = FakeSession(lambda got: (400, {**_stow_answer(stored=got[1:], failed=[(got[0], 0xC000)]),
                                          "Message": "bad PatientName DOE^JANE"}))
    monkeypatch.setattr(DicomWebServer, "session", lambda self: fake)
    queue = RetryQueue(str(tmp_path / "work" / "retry"), base_delay=0.0, servers=[server])
    with caplog.at_level(logging.DEBUG):
        result = queue.send_now(queue.enqueue(paths, server), server)
    assert sorted(result.values()) == ["", "", "", "STOW-RS failure reason 0xC000"]
    assert queue.pending() == [] and [f["reason"] for f in queue.failed()] == ["STOW-RS failure reason 0xC000"]
    assert os.listdir(tmp_path / "work" / "failed") == ["r0.dcm", "r0.dcm.json"] and len(fake.posts) == 1
    # 413: halves until they fit
    fake.answer = lambda got: (413, None) if len(got) > 1 else (200, _stow_answer(stored=got))
    assert stow_files(paths, server) == {p: "" for p in paths}
    assert sorted(len(p) for p in fake.posts[1:]) == [1, 1, 1, 1, 2, 2, 4]
    # 503 with Retry-After: kept, not tried again before the time the server gave
    fake.answer = lambda got: (503, None, {"Retry-After": "120"})
    kept = queue.enqueue(paths[:1], server)
    t = time.time()
    assert queue.send_now(kept, server) == {kept[0]: f"STOW-RS to {server}: HTTP 503 Service Unavailable"}
    assert queue.pending()[0]["next_try"] >= t + 119
    assert queue.retry_due() == 0 and queue.pending()[0]["attempts"] == 1
    # a 4xx without a per-instance answer, its message naming the patient: permanent, and the name nowhere
    fake.answer = lambda got: (400, {"Message": "PatientName DOE^JANE is not valid"})
    with caplog.at_level(logging.DEBUG):
        result = queue.send_now(queue.enqueue(paths[1:2], server), server)
    assert list(result.values()) == [f"STOW-RS to {server}: HTTP 400 Bad Request"]
    assert [f["file"] for f in queue.failed()] == ["r0.dcm", "r1.dcm"]
    notes = "".join(open(os.path.join(tmp_path / "work" / "failed", f)).read()
                    for f in os.listdir(tmp_path / "work" / "failed") if f.endswith(".json"))
    assert "DOE" not in caplog.text + notes + json.dumps(queue.pending())


def test_search_stops_when_the_server_ignores_offset(monkeypatch):
    from cutremain_monai.pacs.dicomweb import DicomWebClient

    page = [{"0020000D": {"vr": "UI", "Value": [f"1.2.3.{i}"]}} for i in range(3)]
    fake = FakeSession(pages=lambda params: page)  # the same page whatever the offset
    monkeypatch.setattr(DicomWebServer, "session", lambda self: fake)
    client = DicomWebClient(DicomWebServer("http://127.0.0.1:9/dicom-web"))
    assert client.search("studies", page=3) == page and fake.gets == 2
    fake.pages = lambda params: page[params["offset"]:params["offset"] + 2]  # a server that pages: every match
    fake.gets = 0
    assert client.search("studies", page=2) == page and fake.gets == 2
