"""Pseudo-masks from mined regions (AE-PSL): the label-map rules, the body mask and PSL's online refresh, each
against a hand-built case."""

import numpy as np
import pytest

from cutremain_monai.localization.normalise import normalise_map
from cutremain_monai.localization.pseudo_masks import IGNORE, body_mask, pseudo_mask, refresh_labels


def _phantom():
    """A bright 'body' (rows 2..7, cols 2..7) with a darker hole inside, on black air."""
    img = np.zeros((10, 10))
    img[2:8, 2:8] = 0.8
    img[4, 4] = 0.1  # a hole: filled
    return img


def test_body_mask_is_otsu_with_holes_filled_and_constant_image_is_all_body():
    body = body_mask(_phantom(), min_area=0.0)
    expected = np.zeros((10, 10), dtype=bool)
    expected[2:8, 2:8] = True
    np.testing.assert_array_equal(body, expected)
    assert body_mask(np.full((5, 5), 0.3)).all()
    speck = _phantom()
    speck[0, 9] = 1.0  # one bright pixel of air noise: dropped below min_area (1% of 100 px = 1 px -> keep >= 2)
    assert not body_mask(speck, min_area=0.02)[0, 9]
    with pytest.raises(ValueError, match="min_area"):
        body_mask(_phantom(), min_area=1.5)


def test_negative_image_is_background_everywhere():
    pm = pseudo_mask(0, np.ones((4, 4), bool), np.ones((4, 4)), None)
    assert pm.dtype == np.uint8 and (pm == 0).all()


def test_rules_lesion_background_ignore_by_hand():
    mined = np.zeros((6, 6), bool)
    mined[1:3, 1:3] = True          # the mined lesion, inside the body
    mined[0, 5] = True              # mined but outside the body -> ignore
    cam = np.zeros((6, 6))
    cam[0:4, 0:4] = 1.0             # high CAM around the lesion -> not background
    cam[5, 5] = 0.1                 # (normalised: 0.1 < 0.2) -> background
    body = np.ones((6, 6), bool)
    body[0, :] = False              # the top row is air
    pm = pseudo_mask(1, mined, cam, body, bg_threshold=0.2)
    expected = np.full((6, 6), IGNORE, np.uint8)
    expected[0:4, 0:4] = IGNORE     # high CAM, not mined: unknown
    expected[4:, :] = 0             # low CAM
    expected[:, 4:] = 0
    expected[0, :] = 0              # outside the body
    expected[1:3, 1:3] = 1          # mined inside the body
    expected[0, 5] = IGNORE         # mined outside the body
    np.testing.assert_array_equal(pm, expected)


def test_two_classes_mined_on_one_pixel_are_ignored_and_absent_classes_take_nothing():
    mined = np.zeros((3, 4, 4), bool)
    mined[0, 0, :2] = True
    mined[1, 0, 1:3] = True          # overlaps class 0 at (0, 1)
    mined[2, 3, 3] = True            # class 2 is absent from the image: its region is not a label
    pm = pseudo_mask([1, 1, 0], mined, None, None)
    assert pm[0, 0] == 1 and pm[0, 1] == IGNORE and pm[0, 2] == 2 and pm[3, 3] == IGNORE
    assert set(np.unique(pm)) == {1, 2, IGNORE}  # no CAM and no body: nothing is background
    with pytest.raises(ValueError, match="C = 3"):
        pseudo_mask([1, 0, 0], mined[:2], None, None)


def test_refresh_fills_only_ignored_pixels_with_confident_allowed_classes():
    init = np.array([[0, 1, IGNORE, IGNORE, IGNORE]], np.uint8)
    # channels: background, class 0, class 1 (absent from the image)
    probs = np.array([[[0.05, 0.95, 0.95, 0.30, 0.02]],
                      [[0.95, 0.05, 0.05, 0.65, 0.03]],
                      [[0.00, 0.00, 0.00, 0.05, 0.95]]])
    out = refresh_labels(init, probs, [1, 0], confidence=0.9)
    # labelled pixels keep their label; (0,2): confident background; (0,3): 0.65 < 0.9 stays ignored;
    # (0,4): the confident class is absent from the image, and no allowed class reaches 0.9 -> ignored
    np.testing.assert_array_equal(out, [[0, 1, 0, IGNORE, IGNORE]])
    with pytest.raises(ValueError, match="C\\+1"):
        refresh_labels(init, probs[:2], [1, 0])


def test_normalise_map():
    np.testing.assert_allclose(normalise_map([[1.0, 3.0], [2.0, 5.0]]), [[0.0, 0.5], [0.25, 1.0]])
    assert (normalise_map(np.full((2, 2), 7.0)) == 0).all()
