"""The map side of the localisation report: which class is explained, which boxes count, one CAM pass for every
positive class, maps brought to the native size."""

import numpy as np
import pytest
import torch

from cutremain_monai.localization.cam import cam
from cutremain_monai.localization.normalise import is_flat, normalise_map
from cutremain_monai.localization.report import (check_map_methods, explained_class, lesion_boxes, positive_class_maps,
                                                 positive_classes, upsample_map)
from cutremain_monai.networks import resnet


def test_positive_classes_and_the_explained_class():
    assert positive_classes([1], "binary") == [0] and positive_classes([0], "binary") == []
    assert positive_classes([0, 0, 1], "multiclass") == [2] and positive_classes([1, 0, 0], "multiclass") == []
    assert positive_classes([1, 0, 1], "multilabel") == [0, 2]
    sample = {"label": [1, 0, 1], "box_labels": ["Nodule", "Mass"], "boxes": [[0, 0, 2, 2], [1, 1, 3, 3]]}
    # multi-label: the class named by the first lesion box that is positive
    assert explained_class(sample, "multilabel", ["Mass", "Effusion", "Nodule"], None) == 2
    assert explained_class(sample, "multilabel", ["Mass", "Effusion", "Nodule"], {"Mass"}) == 0
    assert explained_class({"label": [0]}, "binary", [], None) is None


def test_lesion_boxes_keep_the_lesion_labels_only():
    s = {"boxes": [[0, 0, 2, 2], [1, 1, 3, 3]], "box_labels": ["fracture", "relevant_area"]}
    np.testing.assert_array_equal(lesion_boxes(s, {"fracture"}), [[0, 0, 2, 2]])
    assert lesion_boxes(s, None).shape == (2, 4) and lesion_boxes({}, None).shape == (0, 4)


def test_positive_class_maps_is_one_cam_pass_per_sample():
    torch.manual_seed(0)
    net = resnet(10, num_classes=3).eval()
    x = torch.rand(1, 64, 64)
    maps = positive_class_maps(net, {"image": x, "label": [1, 0, 1]}, "multilabel")
    assert sorted(maps) == [0, 2]
    ref = cam(net, x[None], target=None, normalise=False)
    for c, m in maps.items():
        torch.testing.assert_close(m, ref[0, c].cpu())
    assert positive_class_maps(net, {"image": x, "label": [0, 0, 0]}, "multilabel") == {}


def test_upsample_and_normalise():
    m = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    up = upsample_map(m, (4, 4))
    assert up.shape == (4, 4) and up.min() >= 0.0 and up.max() <= 3.0
    np.testing.assert_allclose(normalise_map(m), [[0, 1 / 3], [2 / 3, 1]])
    assert is_flat(np.full((3, 3), 2.0)) and not is_flat(m)
    assert (normalise_map(np.full((3, 3), 2.0)) == 0).all()


def test_unknown_map_method_is_named():
    assert check_map_methods(["cam", "lrp"]) == ["cam", "lrp"]
    with pytest.raises(ValueError, match="unknown localisation method 'shap'; choose from cam, gradcam"):
        check_map_methods(["cam", "shap"])
