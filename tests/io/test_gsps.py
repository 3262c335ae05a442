import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from cutremain_monai.io.dx_writer import write_dx
from cutremain_monai.io.gsps import gsps_referenced_sop_uids, read_gsps_boxes, write_box_gsps
from tests.conftest import dciodvfy_errors, dcmpschk_ok


@pytest.fixture
def image(tmp_path):
    px = np.random.default_rng(0).integers(0, 4096, (120, 100), dtype=np.uint16)
    path = str(tmp_path / "img.dcm")
    write_dx(path, px, uid_seed="gsps-test", patient_name="SYNTHETIC^PHANTOM", patient_id="SYN-1")
    return path


def test_round_trip_and_validators(tmp_path, image):
    ds = pydicom.dcmread(image)
    boxes = [[10.5, 12, 40, 50.25], [60, 70, 99, 119]]
    out = str(tmp_path / "pr.dcm")
    write_box_gsps(ds, boxes, ["fracture", "normal_region"], out)
    pr = pydicom.dcmread(out)
    assert gsps_referenced_sop_uids(pr) == [ds.SOPInstanceUID]
    found = read_gsps_boxes(pr)[ds.SOPInstanceUID]
    np.testing.assert_allclose([b for b, _ in found], boxes)
    assert [lab for _, lab in found] == ["fracture", "normal_region"]
    assert pr.GraphicAnnotationSequence[0].GraphicObjectSequence[0].GraphicType == "POLYLINE"
    assert dciodvfy_errors(out) == []
    assert dciodvfy_errors(image) == []
    ok, text = dcmpschk_ok(out)
    assert ok, text


def _annotation(graphic_type, points, units="PIXEL", text=None, layer="L1"):
    obj = Dataset()
    obj.GraphicAnnotationUnits = units
    obj.GraphicDimensions = 2
    obj.NumberOfGraphicPoints = len(points)
    obj.GraphicData = [float(v) for p in points for v in p]
    obj.GraphicType = graphic_type
    ann = Dataset()
    ann.GraphicLayer = layer
    ann.GraphicObjectSequence = [obj]
    if text:
        t = Dataset()
        t.UnformattedTextValue = text
        ann.TextObjectSequence = [t]
    return ann


def test_reads_vendor_rectangles_polylines_and_display_units():
    pr = Dataset()
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = "1.2.3"
    series = Dataset()
    series.ReferencedImageSequence = [ref]
    pr.ReferencedSeriesSequence = [series]
    pr.GraphicAnnotationSequence = [
        _annotation("RECTANGLE", [(5, 6), (25, 36)], text="mass"),  # non-standard vendor type
        _annotation("POLYLINE", [(1, 1), (9, 1), (9, 4), (1, 4), (1, 1)], layer="NODULE"),  # closed -> layer name
        _annotation("POLYLINE", [(0, 0), (50, 50)], text="ruler"),  # open line: not a region
        _annotation("POLYLINE", [(0.1, 0.2), (0.5, 0.2), (0.5, 0.6), (0.1, 0.6), (0.1, 0.2)], units="DISPLAY"),
        _annotation("CIRCLE", [(10, 10), (12, 10)]),
    ]
    found = read_gsps_boxes(pr, {"1.2.3": (200, 100)})["1.2.3"]
    assert [lab for _, lab in found] == ["mass", "NODULE", "L1"]
    np.testing.assert_allclose([b for b, _ in found], [[5, 6, 25, 36], [1, 1, 9, 4], [10, 40, 50, 120]], rtol=1e-6)
