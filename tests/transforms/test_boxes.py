import numpy as np
import pytest
import torch
from monai.apps.detection.transforms.dictionary import FlipBoxd, ZoomBoxd
from monai.transforms import Compose, RandAffined

from cutremain_monai.transforms import BoxesToMaskd, SwapBoxAxesd, aspect_ratio_boxes, boxes_to_mask


def test_nine_aspect_ratio_boxes_hand_computed():
    # box centred at (50, 40), width 20, height 10
    out = aspect_ratio_boxes([40, 35, 60, 45])
    expected = []
    for fw in (1.0, 1.5, 2.0):
        for fh in (1.0, 1.5, 2.0):
            expected.append([50 - 10 * fw, 40 - 5 * fh, 50 + 10 * fw, 40 + 5 * fh])
    np.testing.assert_allclose(out, expected)
    assert out.shape == (9, 4)
    clipped = aspect_ratio_boxes([0, 0, 20, 10], image_size=(100, 100))
    np.testing.assert_allclose(clipped[-1], [0, 0, 30, 15])  # 2x: (-10, -5, 30, 15) clipped at 0


def test_mask_pixel_rule():
    m = boxes_to_mask([[2, 3, 5, 7]], (10, 10))
    expected = np.zeros((10, 10), bool)
    expected[3:7, 2:5] = True  # rows y0:y1, columns x0:x1
    np.testing.assert_array_equal(m, expected)
    # fractional box: pixel centres c + 0.5 inside [1.6, 4.4) -> columns 2, 3
    m = boxes_to_mask([[1.6, 0, 4.4, 1]], (2, 6))
    np.testing.assert_array_equal(m[0], [0, 0, 1, 1, 0, 0])
    union = boxes_to_mask([[0, 0, 2, 2], [1, 1, 3, 3]], (4, 4))
    assert union.sum() == 7


def _bright_box_sample(h=64, w=80, box=(10, 20, 30, 28)):
    img = np.zeros((1, h, w), np.float32)
    x0, y0, x1, y1 = box
    img[0, y0:y1, x0:x1] = 1.0
    return {"image": torch.from_numpy(img), "boxes": np.asarray([box], np.float32)}


def test_boxes_follow_flip_and_zoom_through_monai_detection_transforms():
    d = _bright_box_sample()
    pipe = Compose([
        SwapBoxAxesd("boxes"),  # to MONAI's array-axis order
        FlipBoxd(image_keys="image", box_keys="boxes", box_ref_image_keys="image", spatial_axis=1),  # flip columns
        ZoomBoxd(image_keys="image", box_keys="boxes", box_ref_image_keys="image", zoom=(0.5, 0.5), keep_size=False, mode="nearest"),
        SwapBoxAxesd("boxes"),  # back to our (column, row) order
        BoxesToMaskd("boxes"),
    ])
    out = pipe(d)
    assert tuple(out["image"].shape) == (1, 32, 40)
    np.testing.assert_allclose(out["boxes"], [[(80 - 30) / 2, 10, (80 - 10) / 2, 14]])  # hand-computed
    np.testing.assert_array_equal(out["box_mask"][0].numpy() > 0, out["image"][0].numpy() > 0.5)


def test_box_mask_follows_a_small_affine():
    d = BoxesToMaskd("boxes")(_bright_box_sample())
    aff = RandAffined(["image", "box_mask"], prob=1.0, rotate_range=0.2, scale_range=0.1, translate_range=4,
                      mode=("nearest", "nearest"), padding_mode="zeros")
    aff.set_random_state(3)
    out = aff(d)
    np.testing.assert_array_equal(out["box_mask"][0].numpy() > 0.5, out["image"][0].numpy() > 0.5)
    assert out["box_mask"].sum() > 0


def test_bad_boxes():
    with pytest.raises(ValueError, match=r"'boxes' must have shape \(N, 4\).*\(2, 3\)"):
        BoxesToMaskd("boxes")({"image": torch.zeros(1, 4, 4), "boxes": np.zeros((2, 3))})
    with pytest.raises(KeyError):
        BoxesToMaskd("boxes")({"image": torch.zeros(1, 4, 4)})
    assert "box_mask" not in BoxesToMaskd("boxes", allow_missing_keys=True)({"image": torch.zeros(1, 4, 4)})
