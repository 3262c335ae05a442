"""Round trip with a real Orthanc (Debian package ``orthanc``; .ci/run installs it), on 127.0.0.1 with a
temporary configuration and storage folder: images are stored into Orthanc, Orthanc sends them to our listener
(C-STORE, from its REST ``/modalities/.../store``), and the listener's SR / SC / PR come back into Orthanc under
the same study, with the probabilities of the run's predictions.csv."""

import csv
import glob
import io
import json
import os
import time

import pydicom
import pytest

from cutremain_monai.io.sr import read_sr_findings
from cutremain_monai.pacs.node import Destination, Listener
from tests.bundles.conftest import TINY, run_bundle, tiny_datalist
from tests.conftest import ROOT, SAMPLES, free_port
from tests.pacs.orthanc_server import Orthanc, http as _http

CPU = ["train.yaml", "cpu.yaml"]
N_IMAGES = int(os.environ.get("CUTREMAIN_ORTHANC_IMAGES", 60))  # 200 and more: set the variable


@pytest.fixture
def orthanc(tmp_path):
    node_port = free_port()
    server = Orthanc(tmp_path, modalities={"cutremain": ["CUTREMAIN", "127.0.0.1", node_port]})
    yield {"url": server.url, "dicom_port": server.dicom_port, "node_port": node_port}
    server.stop()


@pytest.mark.slow
def test_orthanc_round_trip(tmp_path, orthanc):
    data = tiny_datalist(tmp_path, "clavicle")
    run_bundle("clavicle_fracture", CPU, tmp_path, datalist=data, register_model=False, cam_images=0)
    out = tmp_path / "out"
    json.dump({"threshold": 0.0}, open(out / "threshold.json", "w"))  # every image positive: SR, SC and PR each
    sources = sorted(p for task in ("clavicle", "pelvis", "chest", "covid")
                     for p in glob.glob(os.path.join(SAMPLES, task, "*.dcm")) if not p.endswith("_gsps.dcm"))
    files, studies = [], set()
    for i in range(N_IMAGES):  # N images in studies of 10 (the samples cycled, repeats as new instances)
        ds = pydicom.dcmread(sources[i % len(sources)])
        ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["orthanc-study", str(i // 10)])
        ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["orthanc-series", str(i // 10)])
        if i >= len(sources):
            ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["orthanc-image", str(i)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        files.append(str(tmp_path / f"upload_{i:03d}.dcm"))
        ds.save_as(files[-1])
        studies.add(str(ds.StudyInstanceUID))
    ids = [_http(orthanc["url"] + "/instances", open(p, "rb").read())["ID"] for p in files]
    node = Listener(os.path.join(ROOT, "bundles", "clavicle_fracture"), str(tmp_path / "node"),
                    Destination("127.0.0.1", orthanc["dicom_port"], "ORTHANC"), port=orthanc["node_port"],
                    configs=CPU, overrides={**TINY, "output_dir": str(out)}, quiet_seconds=1.0)
    node.start()
    t0 = time.time()
    try:
        job = _http(orthanc["url"] + "/modalities/cutremain/store", {"Resources": ids, "Synchronous": True})
        assert job.get("FailedInstancesCount", 0) == 0, job
        deadline = time.time() + 600
        # a study may be scored in more than one batch: Orthanc's job opens several associations, and a pause
        # longer than quiet_seconds between two of them (a loaded machine) makes the later images a second batch
        while time.time() < deadline and (sum(s["images"] for s in node.scored) < len(files) or not node.idle()):
            time.sleep(0.5)
        elapsed = time.time() - t0
    finally:
        node.stop()
    assert all(not s.get("error") for s in node.scored), node.scored
    assert len({s["study"] for s in node.scored}) == len(studies), node.scored
    assert sum(s["images"] for s in node.scored) == len(files), node.scored
    assert sum(s["kept_for_retry"] for s in node.scored) == 0 and node.retry.pending() == []
    # our results are in Orthanc, in the studies of their images
    predictions = {}
    for p in glob.glob(str(tmp_path / "node" / "results" / "*" / "*" / "inference" / "predictions.csv")):
        predictions.update({r["file"]: float(r["probability"]) for r in csv.DictReader(open(p))})
    assert len(predictions) == len(files)  # every image scored once
    found = {"SR": 0, "OT": 0, "PR": 0}
    for study in _http(orthanc["url"] + "/studies"):
        info = _http(orthanc["url"] + f"/studies/{study}")
        uid = info["MainDicomTags"]["StudyInstanceUID"]
        for inst in _http(orthanc["url"] + f"/studies/{study}/instances"):
            ds = pydicom.dcmread(io.BytesIO(_http(orthanc["url"] + f"/instances/{inst['ID']}/file")))
            if ds.Modality in found:
                found[ds.Modality] += 1
                assert uid in studies
            if ds.Modality == "SR":
                (row,) = read_sr_findings(ds)
                assert row["probability"] == pytest.approx(predictions[row["image"] + ".dcm"], abs=1e-6)
    assert found == {"SR": len(files), "OT": len(files), "PR": len(files)}, found
    print(f"orthanc round trip: {len(files)} images, {len(studies)} studies in {elapsed:.1f} s")
