import os

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cutremain_monai.io.dicom import DicomReadError, read_xray_dicom
from cutremain_monai.io.dx_writer import write_dx
from tests.conftest import SHARED_DATA, shared_data


def make_cr(path, pixels, photometric="MONOCHROME2", bits=12, signed=False, **attrs):
    """A minimal CR image written with plain pydicom (so the reader is tested on files we did not write with it)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "MRN-12345"
    ds.PatientBirthDate = "19700101"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(signed)
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def pydicom_reference(path, index=0):
    """pydicom's modality LUT + VOI LUT (+ MONOCHROME1 inversion), scaled to [0, 1] with pydicom's own output range."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    values = apply_modality_lut(arr, ds)
    out = apply_voi_lut(values, ds, index=index)
    if "VOILUTSequence" in ds:
        y = out / (2 ** int(ds.VOILUTSequence[index].LUTDescriptor[2]) - 1)
    elif "WindowCenter" in ds:
        # pydicom.pixels.processing.apply_windowing's output range
        if ds.PixelRepresentation == 0:
            y_min, y_max = 0, 2**ds.BitsStored - 1
        else:
            y_min, y_max = -(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1
        if "RescaleSlope" in ds and "RescaleIntercept" in ds and "ModalityLUTSequence" not in ds:
            y_min, y_max = y_min * ds.RescaleSlope + ds.RescaleIntercept, y_max * ds.RescaleSlope + ds.RescaleIntercept
        y = (out - y_min) / (y_max - y_min)
    else:
        y = (out - out.min()) / (out.max() - out.min())
    if ds.PhotometricInterpretation == "MONOCHROME1":
        y = 1.0 - y
    return y.astype(np.float64)


@pytest.fixture
def ramp():
    return (np.arange(40 * 50).reshape(40, 50) * 2).astype(np.uint16)  # 0..3998, 12-bit


@pytest.mark.parametrize(
    "photometric,attrs",
    [
        ("MONOCHROME2", {"WindowCenter": 2000, "WindowWidth": 1000}),
        ("MONOCHROME1", {"WindowCenter": 2000, "WindowWidth": 1000}),
        ("MONOCHROME2", {"RescaleSlope": 2.0, "RescaleIntercept": -1024, "WindowCenter": 1000, "WindowWidth": 3000}),
        ("MONOCHROME1", {"RescaleSlope": 0.5, "RescaleIntercept": 10, "WindowCenter": 600, "WindowWidth": 401}),
        ("MONOCHROME2", {"WindowCenter": 1500, "WindowWidth": 800, "VOILUTFunction": "LINEAR_EXACT"}),
        ("MONOCHROME2", {"WindowCenter": 1500, "WindowWidth": 800, "VOILUTFunction": "SIGMOID"}),
        ("MONOCHROME1", {"WindowCenter": 1500, "WindowWidth": 1, "RescaleSlope": 1, "RescaleIntercept": 0}),
        ("MONOCHROME2", {}),
    ],
)
def test_matches_pydicom_luts(tmp_path, ramp, photometric, attrs):
    path = str(tmp_path / "cr.dcm")
    make_cr(path, ramp, photometric, **attrs)
    img, meta = read_xray_dicom(path)
    assert img.shape == (1, 40, 50) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    np.testing.assert_allclose(img[0], pydicom_reference(path), atol=2e-6)


def test_linear_window_hand_computed(tmp_path):
    # PS3.3 C.11.2.1.2.1 with c = 100, w = 51: 0 at x <= 74.5, 1 at x > 124.5, linear between
    px = np.array([[0, 74, 75, 100, 124, 125, 4000]], dtype=np.uint16)
    path = str(tmp_path / "w.dcm")
    make_cr(path, px, WindowCenter=100, WindowWidth=51)
    img, meta = read_xray_dicom(path)
    expected = np.clip((px[0] - 99.5) / 50 + 0.5, 0, 1)
    np.testing.assert_allclose(img[0, 0], expected, atol=1e-6)
    assert meta["window"]["center"] == 100 and meta["window"]["width"] == 51
    inv_path = str(tmp_path / "w1.dcm")
    make_cr(inv_path, px, "MONOCHROME1", WindowCenter=100, WindowWidth=51)
    np.testing.assert_allclose(read_xray_dicom(inv_path)[0][0, 0], 1 - expected, atol=1e-6)


def test_window_choice_none_explicit_and_raw(tmp_path, ramp):
    path = str(tmp_path / "m.dcm")
    make_cr(path, ramp, WindowCenter=[1000, 3000], WindowWidth=[500, 2000])
    second = read_xray_dicom(path, window=1)[0]
    np.testing.assert_allclose(second, pydicom_reference(path, index=1)[None], atol=2e-6)
    none = read_xray_dicom(path, window="none")[0]
    np.testing.assert_allclose(none[0], ramp / ramp.max(), atol=1e-6)
    explicit = read_xray_dicom(path, window=(2000, 1001))[0]
    np.testing.assert_allclose(explicit[0], np.clip((ramp - 1999.5) / 1000 + 0.5, 0, 1), atol=1e-6)
    raw, meta = read_xray_dicom(path, raw=True)
    np.testing.assert_array_equal(raw[0], ramp)
    with pytest.raises(ValueError, match="window index 2 out of range"):
        read_xray_dicom(path, window=2)


def test_voi_lut_sequence_and_modality_lut_sequence(tmp_path):
    px = (np.arange(64).reshape(8, 8) * 16).astype(np.uint16)  # 0..1008
    lut = Dataset()
    lut.LUTDescriptor = [1024, 0, 8]
    lut.LUTData = [min(255, v // 2) for v in range(1024)]
    path = str(tmp_path / "voilut.dcm")
    ds = make_cr(path, px, bits=10)
    ds.VOILUTSequence = [lut]
    ds["VOILUTSequence"][0]["LUTData"].VR = "US"
    ds.save_as(path, enforce_file_format=True)
    img = read_xray_dicom(path)[0]
    # hand computation (pydicom 3.0's apply_voi wraps inputs > 255 for 8-bit LUTs, so it is not the reference here)
    np.testing.assert_allclose(img[0], np.minimum(255, px // 2) / 255.0, atol=1e-6)

    lut12 = Dataset()
    lut12.LUTDescriptor = [1000, 8, 16]  # first mapped input 8, 1000 entries: inputs < 8 -> entry 0, > 1007 -> last
    lut12.LUTData = [min(65535, 80 * v) for v in range(1000)]
    ds.VOILUTSequence = [lut12]
    ds["VOILUTSequence"][0]["LUTData"].VR = "US"
    ds.save_as(path, enforce_file_format=True)
    img = read_xray_dicom(path)[0]
    expected = np.minimum(65535, 80 * np.clip(px.astype(int) - 8, 0, 999)) / 65535.0
    np.testing.assert_allclose(img[0], expected, atol=1e-6)
    np.testing.assert_allclose(img[0], pydicom_reference(path), atol=1e-6)

    mlut = Dataset()
    mlut.LUTDescriptor = [1024, 0, 12]
    mlut.ModalityLUTType = "OD"
    mlut.LUTData = [4 * v for v in range(1024)]
    path2 = str(tmp_path / "mlut.dcm")
    ds = make_cr(path2, px, bits=10, WindowCenter=2048, WindowWidth=4096)
    ds.ModalityLUTSequence = [mlut]
    ds["ModalityLUTSequence"][0]["LUTData"].VR = "US"
    ds.save_as(path2, enforce_file_format=True)
    # modality LUT: 4 * stored, then the window c=2048, w=4096 (12-bit descriptor: pydicom 3.0 cannot apply it)
    expected = np.clip((4.0 * px - 2047.5) / 4095 + 0.5, 0, 1)
    np.testing.assert_allclose(read_xray_dicom(path2)[0][0], expected, atol=1e-6)


@pytest.mark.parametrize("compression", ["explicit", "rle", "jpegls", "j2k"])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_compressed_round_trip(tmp_path, compression, photometric):
    rng = np.random.default_rng(1)
    px = rng.integers(0, 4096, size=(33, 47), dtype=np.uint16)
    path = str(tmp_path / f"{compression}.dcm")
    write_dx(path, px, photometric=photometric, compression=compression, uid_seed=compression + photometric)
    raw, meta = read_xray_dicom(path, raw=True)
    np.testing.assert_array_equal(raw[0], px)
    img = read_xray_dicom(path)[0]
    np.testing.assert_allclose(img[0], pydicom_reference(path), atol=2e-6)
    assert meta["photometric_interpretation"] == photometric


def test_metadata_has_no_patient_identifiers(tmp_path, ramp):
    path = str(tmp_path / "p.dcm")
    make_cr(path, ramp, WindowCenter=2000, WindowWidth=4000, ImagerPixelSpacing=[0.15, 0.15], ViewPosition="PA")
    img, meta = read_xray_dicom(path)
    text = repr(meta)
    for ident in ("DOE", "JANE", "MRN-12345", "19700101"):
        assert ident not in text
    assert meta["pixel_spacing"] == [0.15, 0.15] and meta["pixel_spacing_source"] == "ImagerPixelSpacing"
    assert meta["view_position"] == "PA" and meta["modality"] == "CR"
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = [0.1, 0.12]
    ds.save_as(path)
    meta = read_xray_dicom(path)[1]
    assert meta["pixel_spacing"] == [0.1, 0.12] and meta["pixel_spacing_source"] == "PixelSpacing"


def test_errors_name_file_and_reason(tmp_path, ramp):
    not_dicom = tmp_path / "notes.dcm"
    not_dicom.write_text("hello")
    with pytest.raises(DicomReadError, match=r"notes\.dcm: not a DICOM file"):
        read_xray_dicom(str(not_dicom))

    good = str(tmp_path / "good.dcm")
    make_cr(good, ramp, WindowCenter=2000, WindowWidth=4000)
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.dcm"
    trunc.write_bytes(data[: len(data) - 1000])
    with pytest.raises(DicomReadError, match=r"trunc\.dcm: .*truncated"):
        read_xray_dicom(str(trunc))

    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(str(tmp_path / "nopix.dcm"))
    with pytest.raises(DicomReadError, match=r"nopix\.dcm: no PixelData"):
        read_xray_dicom(str(tmp_path / "nopix.dcm"))

    ds = pydicom.dcmread(good)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(str(tmp_path / "multi.dcm"))
    with pytest.raises(DicomReadError, match=r"multi\.dcm: multi-frame image \(2 frames\)"):
        read_xray_dicom(str(tmp_path / "multi.dcm"))

    ds = pydicom.dcmread(good)
    ds.PhotometricInterpretation = "RGB"
    ds.SamplesPerPixel = 3
    ds.save_as(str(tmp_path / "rgb.dcm"))
    with pytest.raises(DicomReadError, match=r"rgb\.dcm: unsupported photometric interpretation 'RGB'"):
        read_xray_dicom(str(tmp_path / "rgb.dcm"))

    ds = pydicom.dcmread(good)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(str(tmp_path / "mpeg.dcm"))
    with pytest.raises(DicomReadError, match=r"mpeg\.dcm: transfer syntax .* has no available decoder"):
        read_xray_dicom(str(tmp_path / "mpeg.dcm"))


def test_monai_loadimage_with_reader(tmp_path, ramp):
    from monai.transforms import LoadImage, LoadImaged

    from cutremain_monai.io.loader import XrayDicomReader  # (importing it registers the short name)

    path = str(tmp_path / "l.dcm")
    make_cr(path, ramp, "MONOCHROME1", WindowCenter=2000, WindowWidth=4000)
    expected = read_xray_dicom(path)[0]
    out = LoadImaged(keys="image", reader=XrayDicomReader())({"image": path})["image"]
    assert tuple(out.shape) == (1, 40, 50)  # no transpose
    np.testing.assert_allclose(out.numpy(), expected)
    for name in ("XrayDicomReader", "cutremain_monai.io.loader.XrayDicomReader", "cutremain_monai.io.XrayDicomReader"):
        np.testing.assert_allclose(LoadImage(reader=name, image_only=True)(path).numpy(), expected)


DICOM_DIR = os.path.join(SHARED_DATA, "dicom")
REAL = ["pydicom-data/RG1_J2KR.dcm", "pydicom-data/RG1_J2KI.dcm", "pydicom-data/RG3_J2KR.dcm",
        "pydicom-data/RG3_J2KI.dcm", "siim-acr-cr/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
        "highdicom/dx_image.dcm"]


@pytest.mark.real_data
@pytest.mark.parametrize("name", REAL)
def test_real_files_match_pydicom(name):
    path = shared_data("dicom", name)
    img, meta = read_xray_dicom(path)
    ref = pydicom_reference(path)
    assert img.shape[1:] == ref.shape
    np.testing.assert_allclose(img[0], ref, atol=2e-6)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert meta["photometric_interpretation"] == ds.PhotometricInterpretation
    if ds.PhotometricInterpretation == "MONOCHROME1":
        # inversion: the brightest displayed pixel is where the stored value is lowest
        raw = read_xray_dicom(path, raw=True)[0][0]
        assert img[0].flat[np.argmin(raw)] >= img[0].flat[np.argmax(raw)]
