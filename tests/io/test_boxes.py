import logging

import numpy as np
import pytest

from cutremain_monai.io.boxes import as_boxes, validate_boxes, xywh_to_xyxy


def test_clip_drop_and_messages(caplog):
    boxes = [[10, 10, 20, 20], [-5, 90, 30, 120], [5, 5, 5, 30], [200, 200, 210, 220], [30, 40, 20, 50]]
    with caplog.at_level(logging.WARNING):
        kept, labels, msgs = validate_boxes(boxes, (100, 80), [1, 2, 3, 4, 5], source="img7.dcm")
    np.testing.assert_array_equal(kept, [[10, 10, 20, 20], [0, 90, 30, 100]])
    np.testing.assert_array_equal(labels, [1, 2])
    assert len(msgs) == 4
    assert "img7.dcm: box 1" in msgs[0] and "clipped to [0.0, 90.0, 30.0, 100.0]" in msgs[0]
    assert "box 2" in msgs[1] and "no area" in msgs[1]
    assert "box 3" in msgs[2] and "outside the 80x100 image" in msgs[2]
    assert "box 4" in msgs[3] and "no area" in msgs[3]  # x1 < x0 is not silently swapped
    assert sum("img7.dcm" in r.message for r in caplog.records) == 4


def test_shapes_and_conversion():
    assert as_boxes([]).shape == (0, 4)
    assert as_boxes([1, 2, 3, 4]).shape == (1, 4)
    with pytest.raises(ValueError, match=r"f.dcm: boxes must have shape \(N, 4\).*\(2, 3\)"):
        as_boxes([[1, 2, 3], [4, 5, 6]], "f.dcm")
    with pytest.raises(ValueError, match="non-finite"):
        as_boxes([[0, 0, np.nan, 1]])
    np.testing.assert_array_equal(xywh_to_xyxy([[10, 20, 5, 6]]), [[10, 20, 15, 26]])
    with pytest.raises(ValueError, match="2 boxes but 1 box labels"):
        validate_boxes([[0, 0, 1, 1], [0, 0, 2, 2]], (10, 10), [1], source="x")
