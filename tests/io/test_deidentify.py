"""cutremain deidentify: no identifier survives (names in folders, files and headers), the boxes of a presentation
state still pair with their image, dciodvfy finds no error, the report names attributes (never values), and the
same key maps the same UIDs."""

import csv
import os
import shutil

import pydicom

from cutremain_monai.cli import main
from cutremain_monai.io.gsps import read_gsps_boxes
from tests.conftest import SAMPLES, dciodvfy_errors

NAME, PID, BIRTH = "DOE^JOHN", "12345678", "19700101"


def _export(tmp_path):
    """A PACS-like export: the folder is named after the patient, the headers carry the same identifiers."""
    folder = tmp_path / "export" / f"DOE_JOHN_{PID}_{BIRTH}" / "20240101"
    folder.mkdir(parents=True)
    names = {}
    for src in ("clavicle_000.dcm", "clavicle_000_gsps.dcm"):
        ds = pydicom.dcmread(os.path.join(SAMPLES, "clavicle", src))
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PID, BIRTH
        ds.OtherPatientIDsSequence = [pydicom.Dataset()]
        ds.OtherPatientIDsSequence[0].PatientID = PID
        ds.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"
        ds.add_new(0x00091010, "LO", f"private {NAME}")  # a private attribute with the name
        for kw in ("ImageComments", "StudyDescription", "SeriesDescription", "PatientComments", "ProtocolName",
                   "AdditionalPatientHistory", "DeviceSerialNumber"):  # free text dicognito itself keeps
            setattr(ds, kw, f"{NAME} {PID}")
        ds.file_meta.SourceApplicationEntityTitle = "DOE_PC"
        out = folder / f"{PID}_{src}"
        ds.save_as(out)
        names[src] = ds
    (folder / f"notes_{PID}.txt").write_text(f"{NAME} {PID}")
    return tmp_path / "export", names


def test_no_identifier_survives_and_boxes_still_pair(tmp_path):
    export, originals = _export(tmp_path)
    out = tmp_path / "deid"
    assert main(["deidentify", str(export), str(out)]) == 0
    files = sorted(os.listdir(out))
    assert len(files) == 3 and "deidentify_report.csv" in files  # two DICOM files named by UID, the report
    for f in files:  # byte search of everything written, file names included
        data = (out / f).read_bytes()
        for secret in (b"DOE", b"JOHN", PID.encode(), BIRTH.encode()):
            assert secret not in data and secret.decode() not in f, (f, secret)
    dcm = {f: pydicom.dcmread(out / f) for f in files if f.endswith(".dcm")}
    image = next(d for d in dcm.values() if "PixelData" in d)
    state = next(d for d in dcm.values() if "PixelData" not in d)
    assert image.PatientIdentityRemoved == "YES" and "dicognito" in image.DeidentificationMethod[0]  # (BurnedIn NO)
    assert (image.pixel_array == originals["clavicle_000.dcm"].pixel_array).all()  # pixels kept
    assert image.PhotometricInterpretation == originals["clavicle_000.dcm"].PhotometricInterpretation
    assert image.PatientID == state.PatientID and image.StudyInstanceUID == state.StudyInstanceUID  # one patient still
    boxes = read_gsps_boxes(state)
    before = read_gsps_boxes(originals["clavicle_000_gsps.dcm"])
    assert list(boxes) == [image.SOPInstanceUID]  # the state references the de-identified image
    assert [(b.tolist(), lab) for b, lab in boxes[image.SOPInstanceUID]] == \
        [(b.tolist(), lab) for b, lab in before[originals["clavicle_000.dcm"].SOPInstanceUID]]
    assert dciodvfy_errors(str(out / f"{image.SOPInstanceUID}.dcm")) == []
    rows = list(csv.DictReader(open(out / "deidentify_report.csv")))
    changed = next(r for r in rows if r["file"] == f"{image.SOPInstanceUID}.dcm")["changed"].split(";")
    assert {"PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDsSequence>PatientID"} <= set(changed)


def test_same_key_same_mapping_and_flags(tmp_path):
    export, _ = _export(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    main(["deidentify", str(export), str(a)])
    main(["deidentify", str(export), str(b)])
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))  # keyed: the same UIDs on every run
    from cutremain_monai.pacs.deidentify import deidentify

    deidentify(str(export), str(tmp_path / "k2"), key=bytes.fromhex("77" * 32))
    assert not set(os.listdir(a)) & set(os.listdir(tmp_path / "k2")) - {"deidentify_report.csv"}  # another key: other UIDs
    ds = pydicom.dcmread(os.path.join(SAMPLES, "clavicle", "clavicle_001.dcm"))
    del ds.BurnedInAnnotation
    one = tmp_path / "one"
    one.mkdir()
    ds.save_as(one / "x.dcm")
    main(["deidentify", str(one), str(tmp_path / "c")])
    rows = list(csv.DictReader(open(tmp_path / "c" / "deidentify_report.csv")))
    assert rows[0]["flags"] == "burned-in annotation not stated: the pixels may carry text"
    shutil.rmtree(one)
