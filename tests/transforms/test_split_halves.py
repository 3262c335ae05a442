import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from cutremain_monai.transforms import SplitHalvesd


def sample(boxes, box_labels, label=1, w=100):
    img = MetaTensor(torch.arange(2 * 20 * w, dtype=torch.float32).reshape(2, 20, w))
    return {"image": img, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "box_labels": box_labels, "label": label}


def test_boxes_and_labels_follow_their_half():
    d = sample([[10, 2, 20, 8], [70, 5, 90, 15]], ["fracture", "normal_region"])
    left, right = SplitHalvesd(lesion_box_labels=["fracture"])(d)
    assert torch.equal(left["image"], d["image"][..., :50]) and torch.equal(right["image"], d["image"][..., 50:])
    np.testing.assert_array_equal(left["boxes"], [[10, 2, 20, 8]])
    np.testing.assert_array_equal(right["boxes"], [[20, 5, 40, 15]])  # shifted by the midline
    assert left["label"] == 1 and right["label"] == 0  # right holds only a normal-region box
    assert left["half"] == "left" and right["half"] == "right"
    assert left["image"].affine[1, 3] == 0 and right["image"].affine[1, 3] == 50  # MetaTensor affine follows


def test_box_across_the_midline():
    d = sample([[40, 0, 70, 10]], ["fracture"])  # 10 px left, 20 px right of x = 50
    left, right = SplitHalvesd(min_fraction=0.25)(d)
    np.testing.assert_array_equal(left["boxes"], [[40, 0, 50, 10]])
    np.testing.assert_array_equal(right["boxes"], [[0, 0, 20, 10]])
    assert left["label"] == right["label"] == 1
    left, right = SplitHalvesd(min_fraction=0.5)(d)
    assert len(left["boxes"]) == 0 and left["label"] == 0 and right["label"] == 1


def test_normal_and_unboxed_images_and_vectors():
    left, right = SplitHalvesd()(sample([], [], label=0))
    assert left["label"] == right["label"] == 0
    left, right = SplitHalvesd()(sample([], [], label=2))  # abnormal, side unknown: both keep the label
    assert left["label"] == right["label"] == 2
    d = sample([[60, 0, 80, 5]], ["neck"], label=torch.tensor([0.0, 0.0, 1.0]))
    left, right = SplitHalvesd(normal_label=[1.0, 0.0, 0.0])(d)
    assert torch.equal(left["label"], torch.tensor([1.0, 0.0, 0.0])) and torch.equal(right["label"], d["label"])
    with pytest.raises(ValueError, match="'box_labels' has 2 entries for 1 boxes"):
        SplitHalvesd()(sample([[1, 1, 2, 2]], ["a", "b"]))
