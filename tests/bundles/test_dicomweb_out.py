"""``cutremain infer --dicom-out DIR --send-to URL``: the results of a folder stored into a real Orthanc over STOW-RS
(issue 29), credentials from an environment variable."""

import csv
import json
import os
import shutil

import pydicom
import pytest

from tests.bundles.conftest import BUNDLES, TINY, run_bundle
from tests.conftest import SAMPLES
from tests.pacs.orthanc_server import Orthanc

CPU = ["train.yaml", "cpu.yaml"]


@pytest.mark.slow
def test_infer_sends_its_results_over_stow(tmp_path, clavicle_data, monkeypatch, capsys):
    from cutremain_monai.cli import main as cli_main

    (tmp_path / "orthanc").mkdir()
    orthanc = Orthanc(tmp_path / "orthanc", dicomweb=True, users={"ai": "s3cret-pw"})
    try:
        run_bundle("clavicle_fracture", CPU, tmp_path, datalist=clavicle_data, register_model=False, cam_images=0)
        folder = tmp_path / "pacs"
        folder.mkdir()
        for i in (1, 2):
            shutil.copy(os.path.join(SAMPLES, "clavicle", f"clavicle_00{i}.dcm"), folder / f"IM{i}")
        monkeypatch.setenv("PACS_AUTH", "ai:s3cret-pw")
        rc = cli_main(["infer", "--bundle", os.path.join(BUNDLES, "clavicle_fracture"), "--input", str(folder),
                       "--output-dir", str(tmp_path / "out"), "--dicom-out", str(tmp_path / "dicom"), "--configs",
                       "train.yaml,cpu.yaml", "--overrides", json.dumps({**TINY, "inference_cam": False}),
                       "--send-to", orthanc.dicomweb_url, "--auth-env", "PACS_AUTH"])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "s3cret-pw" not in out
        manifest = list(csv.DictReader(open(tmp_path / "dicom" / "manifest.csv")))
        written = {str(pydicom.dcmread(os.path.join(tmp_path / "dicom", m["path"]), stop_before_pixels=True).SOPInstanceUID)
                   for m in manifest if not m["error"]}
        assert written and written <= set(orthanc.sop_uids())  # every result object is in the PACS
        assert json.loads(out.strip().splitlines()[-1])["not_sent"] == 0
    finally:
        orthanc.stop()
