"""Secondary Capture and findings presentation state out: validators, rendering, what is copied from the source."""

import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from cutremain_monai.io.gsps import read_gsps_file, write_box_gsps
from cutremain_monai.io.secondary_capture import CAPTION_PREFIX, write_secondary_capture
from tests.conftest import SAMPLES, dciodvfy_errors, dcmpschk_ok

IMAGE = os.path.join(SAMPLES, "clavicle", "clavicle_000.dcm")


def test_secondary_capture(tmp_path):
    ds = pydicom.dcmread(IMAGE)
    ds.PatientName, ds.PatientID = "TESTER^SC", "SC-7"
    ds.InstitutionName, ds.StationName = "ST ELSEWHERE HOSPITAL", "XRAYROOM7"
    rgb = np.zeros((ds.Rows, ds.Columns, 3), dtype=np.uint8)
    rgb[10:20, 10:30] = (255, 0, 0)
    path = str(tmp_path / "sc.dcm")
    write_secondary_capture(ds, rgb, ["clavicle_fracture 0.1.0 (registry v3)", "fracture 87%"], path)
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    px = back.pixel_array
    band = px.shape[0] - ds.Rows
    assert px.shape[1:] == (ds.Columns, 3) and band > 0  # the caption sits above the image, covering none of it
    assert (px[band:] == rgb).all()
    assert (px[:band] > 0).any()  # text was drawn
    assert back.BurnedInAnnotation == "YES" and back.PhotometricInterpretation == "RGB"
    assert CAPTION_PREFIX in back.DerivationDescription and "fracture 87%" in back.DerivationDescription
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert (back.PatientName, back.PatientID, back.StudyInstanceUID) == (ds.PatientName, ds.PatientID,
                                                                          ds.StudyInstanceUID)
    assert back.SOPInstanceUID != ds.SOPInstanceUID and back.SeriesInstanceUID != ds.SeriesInstanceUID
    assert "ELSEWHERE" not in str(back) and "XRAYROOM7" not in str(back)  # the source's equipment stays behind
    with pytest.raises(ValueError, match="uint8"):
        write_secondary_capture(ds, rgb.astype(np.float32), [], None)


def test_findings_presentation_state_validates_and_renders(tmp_path):
    ds = pydicom.dcmread(IMAGE)
    ds.decompress()  # (dcmp2pgm decodes no JPEG-LS / JPEG 2000 without extra codecs)
    image = str(tmp_path / "image.dcm")
    ds.save_as(image)
    path = str(tmp_path / "pr.dcm")
    write_box_gsps(ds, [[10, 12, 40, 30]], ["fracture"], path, texts=["fracture 87%"], layer_name="CUTREMAIN_AI",
                   content_label="AI_FINDINGS", series_number=903, series_description="cutremain findings")
    assert dciodvfy_errors(path) == []
    ok, text = dcmpschk_ok(path)
    assert ok, text
    back = pydicom.dcmread(path)
    assert back.GraphicLayerSequence[0].GraphicLayer == "CUTREMAIN_AI" and back.SeriesNumber == 903
    boxes = read_gsps_file(path)
    assert [(b.tolist(), lab) for b, lab in boxes[ds.SOPInstanceUID]] == [([10.0, 12.0, 40.0, 30.0], "fracture 87%")]
    tool = shutil.which("dcmp2pgm")
    assert tool, "dcmp2pgm (Debian package dcmtk) is required; .ci/run installs it"
    pgm = str(tmp_path / "shown.pgm")
    res = subprocess.run([tool, "--pstate", path, image, pgm], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    from PIL import Image

    shown = np.asarray(Image.open(pgm))
    assert shown.shape == (ds.Rows, ds.Columns)
    # rendered under the presentation state: its window is the one applied (a narrow one changes the picture)
    plain = subprocess.run([tool, image, str(tmp_path / "plain.pgm")], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    pr = pydicom.dcmread(path)
    if "SoftcopyVOILUTSequence" not in pr:
        pytest.skip("the sample has no window to carry over")
    assert (shown == np.asarray(Image.open(tmp_path / "plain.pgm"))).all()  # the image's own window, carried over
    pr.SoftcopyVOILUTSequence[0].WindowWidth = 50
    pr.save_as(str(tmp_path / "narrow.dcm"))
    assert subprocess.run([tool, "--pstate", str(tmp_path / "narrow.dcm"), image, str(tmp_path / "narrow.pgm")],
                          capture_output=True).returncode == 0
    narrow = np.asarray(Image.open(tmp_path / "narrow.pgm"))
    assert (narrow != shown).mean() > 0.1


def test_lung_mask_segmentation(tmp_path):
    from cutremain_monai.io.seg import read_mask_seg, write_mask_seg

    ds = pydicom.dcmread(os.path.join(SAMPLES, "covid", sorted(f for f in os.listdir(os.path.join(SAMPLES, "covid"))
                                                                if f.endswith(".dcm"))[0]))
    small = np.zeros((32, 32), dtype=bool)
    small[8:24, 4:14] = True  # a mask at network size: brought to the stored image's size
    path = str(tmp_path / "seg.dcm")
    write_mask_seg(ds, small, path, model_name="covid_severity")
    assert dciodvfy_errors(path) == []
    back = read_mask_seg(path)
    assert back.shape == (ds.Rows, ds.Columns)
    sy, sx = ds.Rows / 32, ds.Columns / 32
    assert back[int(16 * sy), int(9 * sx)] and not back[int(2 * sy), int(28 * sx)]
    assert abs(back.mean() - small.mean()) < 0.02
    seg = pydicom.dcmread(path)
    assert seg.StudyInstanceUID == ds.StudyInstanceUID and seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[
        0].ReferencedSOPInstanceUID == ds.SOPInstanceUID


def test_monochrome1_is_not_shown_inverted(tmp_path):
    """Found in review: for a MONOCHROME1 image (most CR) the presentation state needs an INVERSE presentation
    LUT, or a conforming viewer shows the negative. dcmp2pgm under our state equals the plain rendering."""
    from PIL import Image

    ds = pydicom.dcmread(os.path.join(SAMPLES, "clavicle", "clavicle_001.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    ds.decompress()
    image = str(tmp_path / "image.dcm")
    ds.save_as(image)
    path = str(tmp_path / "pr.dcm")
    write_box_gsps(ds, [[10, 12, 40, 30]], ["fracture"], path)
    assert dcmpschk_ok(path)[0] and dciodvfy_errors(path) == []
    tool = shutil.which("dcmp2pgm")
    assert tool, "dcmp2pgm (Debian package dcmtk) is required; .ci/run installs it"
    subprocess.run([tool, "--pstate", path, image, str(tmp_path / "ps.pgm")], check=True, capture_output=True)
    subprocess.run([tool, image, str(tmp_path / "plain.pgm")], check=True, capture_output=True)
    ps = np.asarray(Image.open(tmp_path / "ps.pgm")).astype(int)
    plain = np.asarray(Image.open(tmp_path / "plain.pgm")).astype(int)
    assert np.corrcoef(ps.ravel(), plain.ravel())[0, 1] > 0.99  # not the negative (which correlates at -1)
