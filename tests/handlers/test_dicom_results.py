"""The pieces of DicomResults checked by hand: maps back onto the source image, the box of a map, findings per
label mode."""

import numpy as np
import pytest

from cutremain_monai.handlers.dicom_results import DicomResults, map_box, to_source_frame


def test_to_source_frame_halves_and_whole():
    cam = np.zeros((4, 4), np.float32)
    cam[:, 2:] = 1.0  # the right half of the network input is hot
    whole, lo = to_source_frame(cam, (8, 10), None)
    assert lo == 0 and whole.shape == (8, 10) and whole[:, 6:].min() > 0.99 and whole[:, :4].max() < 0.01
    right, lo = to_source_frame(cam, (8, 11), "right")  # right half of an 11-wide image: columns 5..10
    assert lo == 5 and right.shape == (8, 6)
    left, lo = to_source_frame(cam, (8, 11), "left")
    assert lo == 0 and left.shape == (8, 5)


def test_map_box_is_the_largest_region():
    cam = np.zeros((10, 12))
    cam[1:3, 1:3] = 0.9  # small
    cam[5:9, 4:11] = 0.8  # large
    assert map_box(cam, 0.5) == [4.0, 5.0, 11.0, 9.0]
    assert map_box(cam, 0.95) is None


@pytest.mark.parametrize("mode, row, boxed", [
    ("binary", {"probability": 0.8, "prediction": 1}, {"fracture": True}),
    ("binary", {"probability": 0.3, "prediction": 0}, {"fracture": False}),
    ("multiclass", {"p_normal": 0.1, "p_A": 0.7, "p_B": 0.2, "prediction": "A"}, {"A": True, "B": False}),
    ("multilabel", {"p_normal": 0.1, "p_A": 0.7, "p_B": 0.6, "prediction": "A|B"}, {"normal": False, "A": True,
                                                                                    "B": True}),
])
def test_findings_per_label_mode(mode, row, boxed):
    names = ["normal", "fracture"] if mode == "binary" else ["normal", "A", "B"]
    handler = DicomResults("/tmp/x", predictions=None, label_mode=mode, class_names=names, enabled=False)
    hot = np.zeros((20, 20), np.float32)
    hot[5:10, 5:15] = 1.0
    full = {c: hot for c in range(len(names))}
    got = {f.name: f for f in handler._findings(row, full, 0.5)}
    assert {n: f.box is not None for n, f in got.items()} == boxed
    for name, f in got.items():
        expected = row["probability"] if mode == "binary" else row[f"p_{name}"]
        assert f.probability == pytest.approx(expected)
        if f.box is not None:
            assert f.box == [5.0, 5.0, 15.0, 10.0]
