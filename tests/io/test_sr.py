"""DICOM Comprehensive SR (TID 1500) out and boxes in: validators, rendering, round trips, other vendors' SRs."""

import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from cutremain_monai.io.dicom import DicomReadError
from cutremain_monai.io.sr import Finding, ModelDevice, read_sr_boxes, read_sr_file, read_sr_findings, write_findings_sr
from tests.conftest import SAMPLES, dciodvfy_errors

IMAGE = os.path.join(SAMPLES, "clavicle", "clavicle_000.dcm")
DEVICE = ModelDevice("clavicle_fracture", "0.1.0", "clavicle_fracture", registry_version="3")


def _image():
    ds = pydicom.dcmread(IMAGE)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "TESTER^SR", "SR-0042", "19700101"
    ds.AccessionNumber = "ACC123"
    ds.InstitutionName, ds.StationName = "ST ELSEWHERE HOSPITAL", "XRAYROOM7"  # the source's, not ours to copy
    return ds


def test_sr_validates_renders_and_reads_back(tmp_path):
    ds = _image()
    path = str(tmp_path / "sr.dcm")
    findings = [Finding("fracture", 0.873, [10, 12, 30.5, 40]), Finding("normal_region", 0.125)]
    sr = write_findings_sr(ds, findings, DEVICE, path)
    assert dciodvfy_errors(path) == []
    tool = shutil.which("dsr2html")
    assert tool, "dsr2html (Debian package dcmtk) is required; .ci/run installs it"
    html = subprocess.run([tool, path], capture_output=True, text=True)
    assert html.returncode == 0, html.stderr
    assert "Fracture of bone" in html.stdout and "87.3" in html.stdout and "12.5" in html.stdout
    assert "clavicle_fracture" in html.stdout  # the device observer
    back = pydicom.dcmread(path)
    rows = read_sr_findings(back)
    assert [(r["finding"], r["probability"], r["image"], r["box"]) for r in rows] == [
        ("fracture", pytest.approx(0.873), ds.SOPInstanceUID, [10.0, 12.0, 30.5, 40.0]),
        ("normal_region", pytest.approx(0.125), None, None)]
    assert {k: [(b.tolist(), lab) for b, lab in v] for k, v in read_sr_boxes(back).items()} == {
        ds.SOPInstanceUID: [([10.0, 12.0, 30.5, 40.0], "fracture")]}
    # new UIDs; the patient and study of the source (the PACS files it with the study), nothing else of it
    assert back.SOPInstanceUID not in (ds.SOPInstanceUID,) and back.SeriesInstanceUID != ds.SeriesInstanceUID
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber"):
        assert str(back.get(kw)) == str(ds.get(kw)), kw
    for kw in ("PixelData", "WindowCenter", "ViewPosition", "BodyPartExamined", "PixelSpacing"):
        assert kw not in back, kw
    text = str(back)
    assert "ELSEWHERE" not in text and "XRAYROOM7" not in text  # (highdicom copies the source's equipment)
    assert back.SeriesNumber == 901 and back.Modality == "SR" and sr.CompletionFlag == "COMPLETE"


def test_box_is_clipped_and_bad_probabilities_refused():
    ds = _image()
    sr = write_findings_sr(ds, [Finding("fracture", 1.0, [-5, 3, 9999, 20])], DEVICE)
    assert read_sr_findings(sr)[0]["box"] == [0.0, 3.0, float(ds.Columns), 20.0]
    with pytest.raises(ValueError, match="probability must be in"):
        write_findings_sr(ds, [Finding("fracture", 1.5)], DEVICE)
    with pytest.raises(ValueError, match="at least one finding"):
        write_findings_sr(ds, [], DEVICE)


def test_another_vendors_polygon_region_is_read(tmp_path):
    """An SR from elsewhere: a POLYGON region in a group whose finding has a code we do not know."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ds = _image()
    region = hd.sr.ImageRegion(graphic_type="POLYLINE", graphic_data=np.asarray(
        [[5, 6], [20, 4], [25, 30], [8, 33], [5, 6]], dtype=float),
        source_image=hd.sr.SourceImageForRegion.from_source_image(ds))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="roi 1"), referenced_region=region,
        finding_type=hd.sr.CodedConcept("44132006", "SCT", "Abscess"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="READER^A"))),
        procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=[group])
    sr = hd.sr.ComprehensiveSR(evidence=[ds], content=report[0], series_instance_uid=hd.UID(), series_number=1,
                               sop_instance_uid=hd.UID(), instance_number=1)
    path = str(tmp_path / "other.dcm")
    sr.save_as(path, enforce_file_format=True)
    boxes = read_sr_file(path)
    assert [(b.tolist(), lab) for b, lab in boxes[ds.SOPInstanceUID]] == [([5.0, 4.0, 25.0, 33.0], "Abscess")]
    with pytest.raises(DicomReadError, match="not a structured report"):
        read_sr_file(IMAGE)


def test_write_ingest_datalist_round_trip(tmp_path):
    """SRs we write, ingested with --sr: the datalist gives back the same boxes and labels."""
    import json

    from cutremain_monai.cli import main as cli_main
    from cutremain_monai.io.datalist import load_datalist
    from cutremain_monai.io.dx_writer import write_dx

    root = tmp_path / "pacs"
    root.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    for i in range(4):
        p = str(root / f"img{i}.dcm")
        write_dx(p, rng.integers(0, 4096, (50, 40), dtype=np.uint16), uid_seed=f"sr{i}", patient_id=f"P{i}")
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if i % 2 == 0:
            box = [2.5 + i, 3.0, 20.0, 30.25]
            write_findings_sr(ds, [Finding("fracture", 0.9, box), Finding("other", 0.1)], DEVICE, str(root / f"sr{i}.dcm"))
            expected[f"img{i}.dcm"] = [box]
    write_findings_sr(pydicom.dcmread(IMAGE), [Finding("fracture", 0.5, [1, 1, 5, 5])], DEVICE, str(root / "orphan.dcm"))
    out = tmp_path / "dl.json"
    assert cli_main(["ingest", str(root), "--sr", "-o", str(tmp_path / "plain.json"), "--no-progress"]) == 0
    assert all(it["boxes"] == [] for it in load_datalist(str(tmp_path / "plain.json")))  # model output: no labels
    rows = open(tmp_path / "plain_quarantine.csv").read()
    assert rows.count("structured report of model findings (not an annotation; --accept-model-output takes it)") == 2
    assert cli_main(["ingest", str(root), "--sr", "--accept-model-output", "-o", str(out), "--no-progress"]) == 0
    items = {os.path.basename(it["image"]): it for it in load_datalist(str(out))}
    assert len(items) == 4
    for name, it in items.items():
        assert it["boxes"] == expected.get(name, []) and it["label"] == int(name in expected)
        assert it["box_labels"] == ["fracture"] * len(expected.get(name, []))
    rows = open(tmp_path / "dl_quarantine.csv").read()
    assert "orphan.dcm,quarantined,structured report references no usable image in the batch" in rows
    assert json.load(open(out))["ingest"]["quarantined"] == 1


def test_malformed_type2_values_do_not_stop_the_results():
    """Found in review: a birth date written 1970-01-01 (not DICOM DA) or a missing StudyID made highdicom refuse
    the SR and the presentation state; the cleaned header empties or adds them."""
    from cutremain_monai.io.dicom import quiet_pydicom, result_source_header
    from cutremain_monai.io.gsps import write_box_gsps

    ds = _image()
    with quiet_pydicom():
        ds.PatientBirthDate = "1970-01-01"
    del ds.StudyID
    clean = result_source_header(ds)
    assert "PixelData" in ds and "PixelData" not in clean and clean.PatientBirthDate in (None, "")
    sr = write_findings_sr(clean, [Finding("fracture", 0.5, [1, 1, 9, 9])], DEVICE)
    pr = write_box_gsps(clean, [[1, 1, 9, 9]], ["fracture"])
    assert sr.StudyID in (None, "") and pr.PatientID == ds.PatientID
