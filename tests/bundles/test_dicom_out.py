"""Folder inference answered in DICOM (issue 15): SR, Secondary Capture and presentation state per image, valid,
renderable, and carrying the probabilities of predictions.csv."""

import csv
import json
import os
import shutil
import subprocess

import pydicom
import pytest

from cutremain_monai.io.sr import read_sr_findings
from tests.bundles.conftest import run_bundle
from tests.conftest import SAMPLES, dciodvfy_errors, dcmpschk_ok

CPU = ["train.yaml", "cpu.yaml"]


@pytest.mark.slow
def test_inference_writes_sr_sc_and_pr(tmp_path, clavicle_data):
    run_bundle("clavicle_fracture", CPU, tmp_path, datalist=clavicle_data, register_model=False, cam_images=0)
    out = tmp_path / "out"
    json.dump({"threshold": 0.0}, open(out / "threshold.json", "w"))  # every image positive: every one gets a box
    folder = tmp_path / "pacs"
    folder.mkdir()
    for i in range(3):
        shutil.copy(os.path.join(SAMPLES, "clavicle", f"clavicle_00{i}.dcm"), folder / f"IM{i}")
    shutil.copy(os.path.join(SAMPLES, "clavicle", "clavicle_000_gsps.dcm"), folder / "PR0")  # not an image
    run_bundle("clavicle_fracture", CPU + ["inference.yaml"], tmp_path, datalist=clavicle_data, input_dir=str(folder),
               dicom_out=True, registry_version="7", inference_cam=False)
    rows = {r["file"]: r for r in csv.DictReader(open(out / "inference" / "predictions.csv"))}
    assert len(rows) == 3
    manifest = list(csv.DictReader(open(out / "inference" / "dicom" / "manifest.csv")))
    assert all(not m["error"] for m in manifest)
    by = {(m["file"], m["object"]): out / "inference" / "dicom" / m["path"] for m in manifest}
    findings = list(csv.DictReader(open(out / "inference" / "dicom" / "findings.csv")))
    assert set(by) == {(f, k) for f in rows for k in ("SR", "SC", "PR")}
    tool = shutil.which("dsr2html")
    assert tool, "dsr2html (Debian package dcmtk) is required; .ci/run installs it"
    for name, row in rows.items():
        src = pydicom.dcmread(folder / name, stop_before_pixels=True)
        for kind in ("SR", "SC", "PR"):
            assert dciodvfy_errors(str(by[name, kind])) == [], (name, kind)
            obj = pydicom.dcmread(by[name, kind])
            assert obj.StudyInstanceUID == src.StudyInstanceUID and obj.PatientID == src.PatientID
            assert obj.SeriesInstanceUID != src.SeriesInstanceUID
        ok, text = dcmpschk_ok(str(by[name, "PR"]))
        assert ok, text
        html = subprocess.run([tool, str(by[name, "SR"])], capture_output=True, text=True)
        assert html.returncode == 0 and "clavicle_fracture" in html.stdout
        (finding,) = read_sr_findings(pydicom.dcmread(by[name, "SR"]))
        assert finding["finding"] == "fracture" and finding["image"] == src.SOPInstanceUID
        assert finding["probability"] == pytest.approx(float(row["probability"]), abs=1e-6)  # the CSV's
        (listed,) = [r for r in findings if r["file"] == name]  # findings.csv: the same box
        assert finding["box"] == pytest.approx([float(listed[k]) for k in ("x0", "y0", "x1", "y1")], abs=1e-3)
        x0, y0, x1, y1 = finding["box"]
        assert 0 <= x0 < x1 <= src.Columns and 0 <= y0 < y1 <= src.Rows
        sc = pydicom.dcmread(by[name, "SC"])
        assert sc.BurnedInAnnotation == "YES" and "registry v7" in sc.DerivationDescription


@pytest.mark.slow
def test_infer_command_with_dicom_out(tmp_path, clavicle_data, capsys):
    """``cutremain infer --dicom-out`` (the command a PACS administrator runs) gives the same objects."""
    from cutremain_monai.cli import main as cli_main
    from tests.bundles.conftest import BUNDLES, TINY

    run_bundle("clavicle_fracture", CPU, tmp_path, datalist=clavicle_data, register_model=False, cam_images=0)
    folder = tmp_path / "pacs"
    folder.mkdir()
    shutil.copy(os.path.join(SAMPLES, "clavicle", "clavicle_001.dcm"), folder / "IM1")
    rc = cli_main(["infer", "--bundle", os.path.join(BUNDLES, "clavicle_fracture"), "--input", str(folder),
                   "--output-dir", str(tmp_path / "out"), "--dicom-out", str(tmp_path / "dicom"), "--configs",
                   "train.yaml,cpu.yaml", "--overrides", json.dumps({**TINY, "inference_cam": False})])
    assert rc == 0
    manifest = list(csv.DictReader(open(tmp_path / "dicom" / "manifest.csv")))
    assert {m["object"] for m in manifest} >= {"SR", "SC"} and all(not m["error"] for m in manifest)
    assert (tmp_path / "out" / "inference" / "predictions.csv").exists()
    printed = capsys.readouterr().out
    assert f"predictions: {tmp_path / 'out' / 'inference' / 'predictions.csv'}; DICOM results:" in printed
