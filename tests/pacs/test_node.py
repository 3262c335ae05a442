"""The DICOM node: sending with a retry folder, and the listener's paths (scored study, duplicate, a non-image,
destination down then up), against a pynetdicom Storage SCP on 127.0.0.1."""

import glob
import json
import os
import shutil
import socket

import pydicom
import pytest

from cutremain_monai.pacs.node import Destination, Listener, RetryQueue, parse_destination, send_files
from tests.bundles.conftest import TINY, run_bundle, tiny_datalist
from tests.conftest import SAMPLES
from tests.pacs.orthanc_server import wait_for

CPU = ["train.yaml", "cpu.yaml"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StoreSCP:
    """A receiving PACS stand-in: keeps every dataset it is sent."""

    def __init__(self, port: int, ae_title: str = "PACS"):
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.received: list = []
        self.port = port
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event):
        self.received.append(event.dataset)
        return 0x0000

    def stop(self):
        self._server.shutdown()


def test_parse_destination():
    assert parse_destination("pacs.local:104:ORTHANC") == Destination("pacs.local", 104, "ORTHANC")
    for bad in ("pacs:104", "pacs:x:AET", "pacs:70000:AET", "pacs:104:" + "A" * 17):
        with pytest.raises(ValueError, match="destination"):
            parse_destination(bad)


def test_send_destination_down_then_retried(tmp_path):
    files = [os.path.join(SAMPLES, "clavicle", f"clavicle_00{i}.dcm") for i in range(3)]
    port = free_port()
    dest = Destination("127.0.0.1", port, "PACS")
    result = send_files(files, dest, timeout=5)
    assert all("association to PACS@127.0.0.1" in r for r in result.values())  # nobody listening
    queue = RetryQueue(str(tmp_path / "retry"), base_delay=0.0)
    for p, reason in result.items():
        queue.add(p, dest, reason)
    assert [item["attempts"] for item in queue.pending()] == [1, 1, 1]
    assert queue.retry_due() == 0 and [item["attempts"] for item in queue.pending()] == [2, 2, 2]  # still down
    scp = StoreSCP(port)
    try:
        assert queue.retry_due() == 3 and queue.pending() == []
        assert sorted(str(d.SOPInstanceUID) for d in scp.received) == sorted(
            str(pydicom.dcmread(p).SOPInstanceUID) for p in files)
    finally:
        scp.stop()


@pytest.mark.slow
def test_listener_scores_a_study_and_keeps_results_until_the_destination_is_up(tmp_path):
    clavicle_data = tiny_datalist(tmp_path, "clavicle")
    run_bundle("clavicle_fracture", CPU, tmp_path, datalist=clavicle_data, register_model=False, cam_images=0)
    out = tmp_path / "out"
    json.dump({"threshold": 0.0}, open(out / "threshold.json", "w"))  # every image positive: SR, SC and PR each
    dest_port, node_port = free_port(), free_port()
    node = Listener(os.path.join(os.path.dirname(__file__), "..", "..", "bundles", "clavicle_fracture"),
                    str(tmp_path / "node"), Destination("127.0.0.1", dest_port, "PACS"), port=node_port,
                    configs=CPU, overrides={**TINY, "output_dir": str(out)}, quiet_seconds=1.0,
                    retry_base_delay=0.5)
    node.start()
    scp = None
    try:
        images = [pydicom.dcmread(os.path.join(SAMPLES, "clavicle", f"clavicle_00{i}.dcm")) for i in range(2)]
        study = images[0].StudyInstanceUID
        for ds in images:
            ds.StudyInstanceUID = study  # one study of two images
        paths = []
        for i, ds in enumerate(images):
            paths.append(str(tmp_path / f"im{i}.dcm"))
            ds.save_as(paths[-1])
        shutil.copy(os.path.join(SAMPLES, "clavicle", "clavicle_000_gsps.dcm"), tmp_path / "pr.dcm")
        shutil.copy(paths[0], tmp_path / "again.dcm")  # a second copy of the same SOP Instance
        broken = pydicom.dcmread(os.path.join(SAMPLES, "clavicle", "clavicle_005.dcm"))
        if broken.file_meta.TransferSyntaxUID.is_compressed:
            broken.decompress()
        broken.StudyInstanceUID = study
        broken.PixelData = broken.PixelData[: len(broken.PixelData) // 3]  # an image whose pixels cannot be read
        broken.save_as(str(tmp_path / "broken.dcm"))
        sent = send_files(paths + [str(tmp_path / "again.dcm"), str(tmp_path / "pr.dcm"), str(tmp_path / "broken.dcm")],
                          Destination("127.0.0.1", node_port, "CUTREMAIN"))
        assert all(r == "" for r in sent.values()), sent  # every object answered, the duplicate and the PR too
        assert wait_for(lambda: node.scored, 120), "the study was not scored"
        record = node.scored[0]
        assert record["images"] == 3 and record["sent"] == 0 and record["kept_for_retry"] == 6  # destination down
        aside = glob.glob(str(tmp_path / "node" / "results" / "*" / "*" / "inference" / "set_aside.csv"))
        assert len(aside) == 1 and "truncated pixel data" in open(aside[0]).read()  # answered, set aside, reason
        assert node.duplicates == 1
        rows = open(tmp_path / "node" / "set_aside.csv").read()
        assert "not a projection X-ray for presentation" in rows
        scp = StoreSCP(dest_port)  # the PACS comes back: the retries deliver everything
        assert wait_for(lambda: len(scp.received) == 6 and not node.retry.pending(), 60), node.retry.pending()
        kinds = sorted(str(d.Modality) for d in scp.received)
        assert kinds == ["OT", "OT", "PR", "PR", "SR", "SR"]
        assert {str(d.StudyInstanceUID) for d in scp.received} == {study}
        # a late instance of the same study: only it is scored, the first two are not answered twice
        late = pydicom.dcmread(os.path.join(SAMPLES, "clavicle", "clavicle_002.dcm"))
        late.StudyInstanceUID = study
        late.save_as(str(tmp_path / "late.dcm"))
        assert send_files([str(tmp_path / "late.dcm")], Destination("127.0.0.1", node_port, "CUTREMAIN")) == {
            str(tmp_path / "late.dcm"): ""}
        assert wait_for(lambda: len(node.scored) == 2 and len(scp.received) == 9, 60), (node.scored, len(scp.received))
        assert node.scored[1]["images"] == 1 and node.scored[1]["sent"] == 3
        assert len({str(d.SOPInstanceUID) for d in scp.received}) == 9
    finally:
        node.stop()
        if scp is not None:
            scp.stop()


def test_listener_quarantines_a_dataset_that_does_not_decode(tmp_path):
    """Received data that pydicom cannot decode is answered (the sender does not resend it for ever) and kept raw,
    with its reason, in quarantine/; the node keeps receiving."""
    import io
    import struct

    from pynetdicom import AE, _config

    ds = pydicom.dcmread(os.path.join(SAMPLES, "clavicle", "clavicle_000.dcm"))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    i = raw.index(b"\x08\x00\x16\x00UI", 132)  # before SOP Class UID: a sequence of garbage, no item tags
    (tmp_path / "bad.dcm").write_bytes(raw[:i] + b"\x08\x00\x06\x00SQ\x00\x00\xff\xff\xff\xff"
                                       + struct.pack("<I", 0x78563412) * 8 + raw[i:])
    port = free_port()
    node = Listener(str(tmp_path), str(tmp_path / "node"), Destination("127.0.0.1", free_port(), "PACS"), port=port)
    node.start()
    try:
        ae = AE("TEST")
        ae.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        assoc = ae.associate("127.0.0.1", port, ae_title="CUTREMAIN")
        assert assoc.is_established
        _config.STORE_SEND_CHUNKED_DATASET = True  # a file path is sent as it is, without decoding
        try:
            status = assoc.send_c_store(str(tmp_path / "bad.dcm"))
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
        good = assoc.send_c_store(ds)
        assoc.release()
        assert int(status.Status) == 0 and int(good.Status) == 0
        rows = open(tmp_path / "node" / "quarantine.csv").read().splitlines()
        assert len(rows) == 2 and rows[1].endswith(",received dataset undecodable (OSError)"), rows
        (kept,) = os.listdir(tmp_path / "node" / "quarantine")
        assert rows[1].startswith(kept) and b"\x12\x34\x56\x78" in (tmp_path / "node" / "quarantine" / kept).read_bytes()
        assert node.known(str(ds.SOPInstanceUID))  # the good one is filed
    finally:
        node.stop()


def _score_raising_a_name(bundle, configs, settings):
    raise ValueError("cannot read (0010,0010) PatientName 'DOE^JANE' of the image")


def test_an_error_naming_a_patient_never_reaches_the_report_or_the_log(tmp_path, caplog):
    """The scoring process's error is carried by its type only: the study is tried again, then set aside, and
    neither set_aside.csv, the report nor the log holds the exception's text; the set-aside instance is in the
    ledger (a restarted node knows it)."""
    import logging

    from cutremain_monai.pacs.node import StudyNode

    node = StudyNode(str(tmp_path), str(tmp_path / "node"), Destination("127.0.0.1", free_port(), "PACS"),
                     quiet_seconds=0.0, study_retry_delay=0.0, score_fn=_score_raising_a_name)
    ds = pydicom.dcmread(os.path.join(SAMPLES, "clavicle", "clavicle_005.dcm"))
    try:
        with caplog.at_level(logging.DEBUG):
            assert node.file_instance(ds) == ""
            node.score_due()
            node.score_due()
    finally:
        node.stop_scoring()
    assert [s.get("error") for s in node.scored] == ["ValueError", "ValueError"] and node.scored[1]["set_aside"]
    text = open(tmp_path / "node" / "set_aside.csv").read() + json.dumps(node.report()) + caplog.text
    assert "study not scored twice: ValueError" in text and "DOE" not in text
    assert open(tmp_path / "node" / "handled_uids.txt").read().split() == [str(ds.SOPInstanceUID)]
    again = StudyNode(str(tmp_path), str(tmp_path / "node"), Destination("127.0.0.1", free_port(), "PACS"))
    assert again.known(str(ds.SOPInstanceUID))
