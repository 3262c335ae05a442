"""folder_datalist: which files of a folder are images, by DICOM header (SOP class, pixel data, photometric
interpretation) or by image suffix, whatever the file names; masks; the report of what was left out."""

import csv
import glob
import logging
import os
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from cutremain_monai.data.folder import IMAGE_SOP_CLASS_UIDS, folder_datalist
from tests.conftest import SAMPLES

DX = os.path.join(SAMPLES, "chest", "chest_005.dcm")  # uncompressed DX, MONOCHROME2
DX_RLE = os.path.join(SAMPLES, "chest", "chest_001.dcm")  # RLE, MONOCHROME1
GSPS = os.path.join(SAMPLES, "clavicle", "clavicle_006_gsps.dcm")
NAME, PID = "DOE^JANE", "PID-4711"  # must never reach a reason or the report
GSPS_REASON = "presentation state (Grayscale Softcopy Presentation State Storage)"


def _write(path, sop_class, photometric="MONOCHROME2", pixels=True, tsuid=ExplicitVRLittleEndian, **attrs):
    """A minimal DICOM file of ``sop_class`` (with 4x4 pixel data unless ``pixels`` is False)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = tsuid
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = NAME, PID
    ds.Modality = "OT"
    if pixels:
        rgb = photometric in ("RGB", "YBR_FULL")
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel = 3 if rgb else 1
        if rgb:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = np.arange(16 * ds.SamplesPerPixel, dtype=np.uint8).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _comprehensive_sr(path):
    import highdicom as hd
    from highdicom.sr import ContainerContentItem, RelationshipTypeValues, TextContentItem
    from pydicom.sr.codedict import codes

    content = ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, template_id="1500")
    content.ContentSequence = [TextContentItem(name=codes.DCM.Finding, value="no fracture",
                                               relationship_type=RelationshipTypeValues.CONTAINS)]
    sr = hd.sr.ComprehensiveSR(evidence=[pydicom.dcmread(DX)], content=content, series_instance_uid=hd.UID(),
                               series_number=9, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test")
    sr.PatientName, sr.PatientID = NAME, PID
    assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sr.save_as(path, enforce_file_format=True)


def _copy(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst)


def _png(path, size=(6, 5)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.zeros(size[::-1], np.uint8)).save(path)


def _text(path, text="hello\n"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _ids(items):
    return [it["image_id"] for it in items]


def _reasons(skipped):
    return {s["file"]: s["reason"] for s in skipped}


def test_dicom_samples_by_header_not_by_name():
    # (a bundle trained on the samples' datalist leaves its cache, .preprocessed/, beside it: not a sample)
    assert sorted(n for n in os.listdir(SAMPLES) if n != ".preprocessed") == [
        "README.md", "chest", "clavicle", "covid", "datalist.json", "pelvis"]
    files = sorted(os.path.relpath(p, SAMPLES).replace(os.sep, "/")
                   for p in glob.glob(os.path.join(SAMPLES, "**", "*"), recursive=True) if os.path.isfile(p))
    states = [f for f in files if f.endswith("_gsps.dcm")]
    images = [f for f in files if f.endswith((".dcm", ".png")) and f not in states]
    assert len(states) == 154 and len(images) == 184 + 16  # 184 DX, 16 lung-mask PNGs (images without a suffix)
    items, skipped = folder_datalist(SAMPLES)
    assert items == [{"image": os.path.join(SAMPLES, *f.split("/")), "image_id": f} for f in images]
    expected = {f: GSPS_REASON for f in states}
    expected["README.md"] = "not DICOM and not an image file type (.md)"
    expected["datalist.json"] = "not DICOM and not an image file type (.json)"
    assert _reasons(skipped) == expected
    assert [s["file"] for s in skipped] == sorted(expected)  # deterministic order
    assert folder_datalist(SAMPLES) == (items, skipped)


def test_samples_masks_beside_images():
    covid = os.path.join(SAMPLES, "covid")
    items, skipped = folder_datalist(covid, mask_dir=covid, mask_suffix="_lungs")
    assert items == [{"image": os.path.join(covid, f"covid_{i:03d}.dcm"), "image_id": f"covid_{i:03d}.dcm",
                      "lung_mask": os.path.join(covid, f"covid_{i:03d}_lungs.png")} for i in range(16)]
    assert skipped == [{"file": f"covid_{i:03d}_lungs.png", "reason": "lung mask"} for i in range(16)]


@pytest.fixture
def export(tmp_path):
    """A PACS-like export: suffix-less names, UID names, nested folders, non-image objects and stray files."""
    root = tmp_path / "export"
    _copy(DX, str(root / "IM000001"))  # DX without suffix
    _copy(GSPS, str(root / "IM000002"))  # presentation state without suffix: skipped by SOP class
    _copy(DX_RLE, str(root / "nested" / "deeper" / "IM000003"))
    _comprehensive_sr(str(root / "sr" / "1.2.826.0.1.3680043.8.498.7"))  # UID name: ".7" is no suffix
    _write(str(root / "sc_rgb.dcm"), pydicom.uid.SecondaryCaptureImageStorage, photometric="RGB")
    _write(str(root / "sc_grey"), pydicom.uid.SecondaryCaptureImageStorage)
    _text(str(root / "notes.txt"))
    _text(str(root / "LOCKFILE"))
    _text(str(root / "fake.dcm"), "not dicom at all")
    _png(str(root / "nested" / "photo.png"))
    _text(str(root / "nested" / "broken.png"), "not a png")
    (root / "nested" / "volume.nii.gz").write_bytes(b"\x00" * 16)  # by suffix only: not opened
    (root / "nested" / "meta.mhd").write_text("ElementDataFile = meta.raw\n")
    (root / "nested" / "meta.raw").write_bytes(b"\x00" * 16)
    shutil.make_archive(str(root / "bundle"), "zip", str(tmp_path), "export/notes.txt")
    ds = pydicom.dcmread(DX)
    del ds.PixelData
    ds.save_as(str(root / "header_only.dcm"))
    ds.save_as(str(root / "header_only_padded.dcm"))
    with open(root / "header_only_padded.dcm", "ab") as f:
        f.write(b"\x00\x00\x00")  # trailing bytes: the reader cannot tell from the file position alone
    data = open(DX, "rb").read()
    (root / "truncated_meta.dcm").write_bytes(data[:200])  # cut inside the file meta information
    cut = pydicom.dcmread(DX, stop_before_pixels=True).get_item(0x00281050).value_tell + 3  # Window Center
    (root / "truncated_header.dcm").write_bytes(data[:cut])
    return root


EXPORT_ITEMS = ["IM000001", "nested/deeper/IM000003", "nested/meta.mhd", "nested/photo.png", "nested/volume.nii.gz",
                "sc_grey"]
EXPORT_SKIPPED = {
    "IM000002": GSPS_REASON,
    "LOCKFILE": "not DICOM and not an image file type (no suffix)",
    "bundle.zip": "not DICOM and not an image file type (.zip)",
    "fake.dcm": "not a DICOM file (no DICM preamble)",
    "header_only.dcm": "DICOM image without pixel data",
    "header_only_padded.dcm": "DICOM image without pixel data",
    "nested/broken.png": "not a readable PNG image (UnidentifiedImageError)",
    "nested/meta.raw": "not DICOM and not an image file type (.raw)",
    "notes.txt": "not DICOM and not an image file type (.txt)",
    "sc_rgb.dcm": "photometric interpretation RGB not supported",
    "sr/1.2.826.0.1.3680043.8.498.7": "structured report (Comprehensive SR Storage)",
    "truncated_header.dcm": "truncated DICOM file",
    "truncated_meta.dcm": "empty or truncated DICOM dataset",
}


def test_export_items_and_reasons(export, tmp_path, caplog):
    report = tmp_path / "out" / "left_out.csv"
    with caplog.at_level(logging.INFO, logger="cutremain_monai.data.folder"):
        items, skipped = folder_datalist(export, report=report)
    assert items == [{"image": os.path.join(str(export), *i.split("/")), "image_id": i} for i in EXPORT_ITEMS]
    assert _reasons(skipped) == EXPORT_SKIPPED
    assert [s["file"] for s in skipped] == sorted(EXPORT_SKIPPED)
    with open(report, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "reason"]
    assert rows[1:] == [[s["file"], s["reason"]] for s in skipped]
    text = open(report).read() + caplog.text
    assert NAME not in text and PID not in text and "SYNTHETIC" not in text and "SYN-" not in text
    assert f"6 images, 13 files left out (see {report})" in caplog.text


def test_no_pixels_read(export, monkeypatch):
    """Only headers are read: the pixel data of no file is loaded or decoded."""
    def boom(self, *a, **k):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(boom))
    calls = []
    real = pydicom.dcmread

    def spy(fp, *a, **k):
        calls.append(k.get("stop_before_pixels") or k.get("defer_size") is not None)
        return real(fp, *a, **k)

    monkeypatch.setattr(pydicom, "dcmread", spy)
    items, _ = folder_datalist(export)
    assert len(items) == len(EXPORT_ITEMS)
    assert calls and all(calls)


NOT_IMAGES = {
    pydicom.uid.BasicTextSRStorage: "structured report (Basic Text SR Storage)",
    pydicom.uid.EnhancedSRStorage: "structured report (Enhanced SR Storage)",
    pydicom.uid.Comprehensive3DSRStorage: "structured report (Comprehensive 3D SR Storage)",
    pydicom.uid.ExtensibleSRStorage: "structured report (Extensible SR Storage)",
    pydicom.uid.KeyObjectSelectionDocumentStorage: "structured report (Key Object Selection Document Storage)",
    pydicom.uid.XRayRadiationDoseSRStorage: "structured report (X-Ray Radiation Dose SR Storage)",
    pydicom.uid.ColorSoftcopyPresentationStateStorage: "presentation state (Color Softcopy Presentation State Storage)",
    pydicom.uid.PseudoColorSoftcopyPresentationStateStorage:
        "presentation state (Pseudo-Color Softcopy Presentation State Storage)",
    pydicom.uid.XAXRFGrayscaleSoftcopyPresentationStateStorage:
        "presentation state (XA/XRF Grayscale Softcopy Presentation State Storage)",
    pydicom.uid.SegmentationStorage: "segmentation (Segmentation Storage)",
    pydicom.uid.EncapsulatedPDFStorage: "encapsulated document (Encapsulated PDF Storage)",
    pydicom.uid.RawDataStorage: "raw data (Raw Data Storage)",
    pydicom.uid.TwelveLeadECGWaveformStorage: "waveform (12-lead ECG Waveform Storage)",
    pydicom.uid.SpatialRegistrationStorage: "not an image (Spatial Registration Storage)",
    pydicom.uid.ParametricMapStorage: "not an image (Parametric Map Storage)",
    "1.2.3.4.5.6": "unknown SOP class 1.2.3.4.5.6 (not an image storage class)",
}
IMAGES = [pydicom.uid.ComputedRadiographyImageStorage, pydicom.uid.DigitalXRayImageStorageForProcessing,
          pydicom.uid.DigitalMammographyXRayImageStorageForPresentation, pydicom.uid.SecondaryCaptureImageStorage]


def test_sop_class_positive_list(tmp_path):
    """Every object has MONOCHROME2 pixel data (as a segmentation does): the SOP class alone decides."""
    for i, uid in enumerate(NOT_IMAGES):
        _write(str(tmp_path / "in" / f"obj{i:02d}"), uid)
    for i, uid in enumerate(IMAGES):
        _write(str(tmp_path / "in" / f"img{i:02d}"), uid, photometric=("MONOCHROME1", "MONOCHROME2")[i % 2])
    items, skipped = folder_datalist(tmp_path / "in")
    assert _ids(items) == [f"img{i:02d}" for i in range(len(IMAGES))]
    assert _reasons(skipped) == {f"obj{i:02d}": r for i, r in enumerate(NOT_IMAGES.values())}
    assert all(u in IMAGE_SOP_CLASS_UIDS for u in IMAGES)
    assert not any(u in IMAGE_SOP_CLASS_UIDS for u in NOT_IMAGES)
    for uid in IMAGE_SOP_CLASS_UIDS:  # nothing but image storage classes on the list
        assert "Image Storage" in UID(uid).name


def test_dicomdir_export(tmp_path):
    from pydicom.fileset import FileSet

    ds = pydicom.dcmread(DX)
    ds.StudyID = "1"
    fs = FileSet()
    fs.add(ds)
    fs.write(str(tmp_path / "cd"))
    items, skipped = folder_datalist(tmp_path / "cd")
    assert _ids(items) == ["PT000000/ST000000/SE000000/IM000000"]
    assert skipped == [{"file": "DICOMDIR", "reason": "DICOMDIR (Media Storage Directory Storage)"}]


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # from writing the odd values
def test_deflated_float_pixels_and_odd_values(tmp_path, caplog):
    deflated = pydicom.uid.DeflatedExplicitVRLittleEndian
    _write(str(tmp_path / "in" / "a"), pydicom.uid.DigitalXRayImageStorageForPresentation, tsuid=deflated)
    _write(str(tmp_path / "in" / "b"), pydicom.uid.DigitalXRayImageStorageForPresentation, tsuid=deflated,
           pixels=False, PhotometricInterpretation="MONOCHROME2")
    _write(str(tmp_path / "in" / "c"), pydicom.uid.DigitalXRayImageStorageForPresentation, pixels=False,
           FloatPixelData=np.zeros(16, np.float32).tobytes(), PhotometricInterpretation="MONOCHROME2")
    _write(str(tmp_path / "in" / "d"), pydicom.uid.DigitalXRayImageStorageForPresentation, photometric="")
    _write(str(tmp_path / "in" / "e"), pydicom.uid.DigitalXRayImageStorageForPresentation, photometric="DOE^JANE")
    _write(str(tmp_path / "in" / "f"), "DOE^JANE")
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        items, skipped = folder_datalist(tmp_path / "in")
    assert "DOE" not in caplog.text  # pydicom's validation of the odd values logs nothing
    assert _ids(items) == ["a", "c"]
    assert _reasons(skipped) == {"b": "DICOM image without pixel data", "d": "no photometric interpretation",
                                 "e": "photometric interpretation (not a defined term) not supported",
                                 "f": "invalid SOP Class UID"}


def test_mask_folder(tmp_path):
    src, masks = tmp_path / "in", tmp_path / "masks"
    _copy(DX, str(src / "a" / "IM000001"))
    _copy(DX, str(src / "b.dcm"))
    _png(str(src / "c.png"))
    _copy(DX, str(src / "1.2.840.99.5"))  # the mask of a UID-named file keeps the whole name
    _png(str(src / "d_m.png"))  # named like a mask: not an image
    (masks / "a").mkdir(parents=True)
    (masks / "a" / "IM000001_m.nii.gz").write_bytes(b"\x00")
    _png(str(masks / "b_m.png"))
    _copy(DX, str(masks / "b_m.dcm"))  # .png comes first
    _png(str(masks / "1.2.840.99.5_m.jpg"))
    _png(str(masks / "c.png"))  # without the suffix: not c.png's mask
    items, skipped = folder_datalist(src, mask_dir=masks, mask_suffix="_m", mask_key="mask")
    i = {it["image_id"]: it for it in items}
    assert sorted(i) == ["1.2.840.99.5", "a/IM000001", "b.dcm", "c.png"]
    assert i["a/IM000001"]["mask"] == str(masks / "a" / "IM000001_m.nii.gz")
    assert i["b.dcm"]["mask"] == str(masks / "b_m.png")
    assert i["1.2.840.99.5"]["mask"] == str(masks / "1.2.840.99.5_m.jpg")
    assert "mask" not in i["c.png"] and set(i["c.png"]) == {"image", "image_id"}
    assert skipped == [{"file": "d_m.png", "reason": "mask"}]
    # without a suffix the mask of c.png is masks/c.png; and no mask_dir: no mask key at all
    items, _ = folder_datalist(src, mask_dir=masks)
    assert {it["image_id"]: it.get("lung_mask") for it in items}["c.png"] == str(masks / "c.png")
    items, skipped = folder_datalist(src)
    assert all(set(it) == {"image", "image_id"} for it in items) and _ids(items)[-1] == "d_m.png"


def test_mask_folder_inside_input(tmp_path):
    root = tmp_path / "in"
    _copy(DX, str(root / "x" / "img.dcm"))
    _png(str(root / "masks" / "x" / "img.png"))
    items, skipped = folder_datalist(root, mask_dir=root / "masks")
    assert items == [{"image": str(root / "x" / "img.dcm"), "image_id": "x/img.dcm",
                      "lung_mask": str(root / "masks" / "x" / "img.png")}]
    assert skipped == [{"file": "masks/x/img.png", "reason": "lung mask"}]


def test_missing_folders_and_empty(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="input folder does not exist: .*nowhere"):
        folder_datalist(tmp_path / "nowhere")
    _text(str(tmp_path / "file.txt"))
    with pytest.raises(NotADirectoryError, match="file.txt"):
        folder_datalist(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="mask folder does not exist: .*nomasks"):
        folder_datalist(tmp_path / "empty", mask_dir=tmp_path / "nomasks")
    with caplog.at_level(logging.WARNING, logger="cutremain_monai.data.folder"):
        assert folder_datalist(tmp_path / "empty") == ([], [])
    assert "no images found in" in caplog.text and "empty" in caplog.text


def test_unreadable_header_does_not_stop_the_folder(tmp_path, monkeypatch):
    _copy(DX, str(tmp_path / "in" / "a"))
    _copy(DX, str(tmp_path / "in" / "b"))
    import cutremain_monai.io.dicom as D

    real, real_init, opened = pydicom.dcmread, D.UnnamedFile.__init__, []

    def init(self, path):
        opened.append(os.fspath(path))
        real_init(self, path)

    def flaky(fp, *a, **k):
        assert not hasattr(fp, "name")  # pydicom never sees the path (its messages would quote it)
        if opened[-1].endswith(os.sep + "a"):
            raise EOFError("quote of a PatientName")
        return real(fp, *a, **k)

    monkeypatch.setattr(D.UnnamedFile, "__init__", init)

    monkeypatch.setattr(pydicom, "dcmread", flaky)
    items, skipped = folder_datalist(tmp_path / "in")
    assert _ids(items) == ["b"]
    assert skipped == [{"file": "a", "reason": "unreadable DICOM header (EOFError)"}]


def test_exported_from_the_package():
    import cutremain_monai.data

    assert cutremain_monai.data.folder_datalist is folder_datalist


def test_patient_named_folders_are_named_by_uid(tmp_path):
    """``auto``: a folder named after the patient in its headers -> image ids are SOP Instance UIDs, other files
    keyed tokens; ``relative`` keeps paths (for exports known to be safe)."""
    from cutremain_monai.data.phantoms import generate_export_tree
    from cutremain_monai.io.paths import file_token

    tree = generate_export_tree(str(tmp_path / "in"), 4, not_dicom=0.25)
    items, skipped = folder_datalist(tmp_path / "in")
    uids = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in tree["images"])
    assert sorted(_ids(items)) == [u + ".dcm" for u in uids]
    note = os.path.relpath(tree["not_dicom"][0], tmp_path / "in").replace(os.sep, "/")
    assert skipped == [{"file": file_token(note), "reason": "not DICOM and not an image file type (.txt)"}]
    items, skipped = folder_datalist(tmp_path / "in", path_mode="relative")
    assert all(i.startswith(tree["patients"][0]["name"]) or "^" in i for i in _ids(items)) and skipped[0]["file"] == note
    plain = tmp_path / "plain"
    _copy(DX, str(plain / "x" / "IM1"))
    assert _ids(folder_datalist(plain)[0]) == ["x/IM1"]  # no identifier in the path: relative names


def test_the_bundles_cache_folder_is_not_part_of_an_export(tmp_path, caplog):
    import logging
    import shutil

    shutil.copy(os.path.join(SAMPLES, "clavicle", "clavicle_001.dcm"), tmp_path / "IM1")
    cache = tmp_path / ".preprocessed" / "0123456789abcdef" / "ab"
    cache.mkdir(parents=True)
    (cache / "ab01.rec").write_bytes(b"CRPC1\n" + bytes(64))
    (tmp_path / "sub" / ".preprocessed").mkdir(parents=True)
    (tmp_path / "sub" / ".preprocessed" / "x.rec").write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger="cutremain_monai.data.folder"):
        items, skipped = folder_datalist(str(tmp_path))
    assert [it["image_id"] for it in items] == ["IM1"] and skipped == []
    assert caplog.text.count("left out the preprocessed cache") == 2
