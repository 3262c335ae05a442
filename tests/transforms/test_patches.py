"""RandPatchesd (patches with their image's label, P / F / N types) and the background plan, by hand."""

import numpy as np
import pytest
import torch

from cutremain_monai.transforms import BoxesToMaskd, RandPatches, RandPatchesd, background_plan, patch_type


def _sample(label, box=None, size=64):
    img = torch.arange(size * size, dtype=torch.float32).reshape(1, size, size)
    mask = torch.zeros(1, size, size)
    if box is not None:
        x0, y0, x1, y1 = box
        mask[:, y0:y1, x0:x1] = 1
    return {"image": img, "label": label, "box_mask": mask, "image_path": "a.png"}


def test_patches_are_crops_at_the_corners():
    t = RandPatches(num_patches=5, patch_size=16).set_random_state(3)
    img = torch.rand(2, 40, 50)
    out = t(img)
    assert out.shape == (5, 2, 16, 16)
    for k, (y, x) in enumerate(t.corners):
        assert 0 <= y <= 24 and 0 <= x <= 34
        assert torch.equal(out[k], img[:, y : y + 16, x : x + 16])
    with pytest.raises(ValueError, match="smaller than the patch"):
        RandPatches(1, 64)(torch.rand(1, 32, 32))


def test_types_and_counts_by_hand():
    box = (10, 10, 30, 30)
    t = RandPatchesd(num_patches=40, patch_size=16, background_patches=3, min_inside=0.1).set_random_state(0)
    out = t(_sample(1, box))
    assert len(out) == 40
    for s in out:
        x0, y0, x1, y1 = (int(v) for v in s["patch_box"])
        assert torch.equal(s["image"], _sample(1)["image"][:, y0:y1, x0:x1]) and s["label"].tolist() == [1.0]
        # share of the patch inside the box, by hand
        ix = max(0, min(x1, box[2]) - max(x0, box[0]))
        iy = max(0, min(y1, box[3]) - max(y0, box[1]))
        want = "P" if ix * iy / 256 >= 0.1 else "F"
        assert s["patch_type"] == want
        assert set(s) == {"image", "label", "box_mask", "patch_type", "patch_box"}
    assert {s["patch_type"] for s in out} == {"P", "F"}
    bg = t(_sample(0, None))
    assert len(bg) == 3 and all(s["patch_type"] == "N" and s["label"].tolist() == [0.0] for s in bg)
    no_mask = {k: v for k, v in _sample(1).items() if k != "box_mask"}
    assert {s["patch_type"] for s in t(no_mask)} == {"?"}
    assert patch_type(1, torch.ones(1, 4, 4) * (torch.arange(16).reshape(1, 4, 4) < 2), 0.1) == "P"  # 2/16 >= 0.1
    assert patch_type(1, torch.ones(1, 4, 4) * (torch.arange(16).reshape(1, 4, 4) < 1), 0.1) == "F"  # 1/16 < 0.1


def test_seeded_and_keep_keys():
    a = RandPatchesd(num_patches=4, patch_size=8, keep_keys=["image_path"]).set_random_state(5)(_sample(1))
    b = RandPatchesd(num_patches=4, patch_size=8, keep_keys=["image_path"]).set_random_state(5)(_sample(1))
    assert [s["patch_box"].tolist() for s in a] == [s["patch_box"].tolist() for s in b]
    assert all(s["image_path"] == "a.png" for s in a)


def test_background_plan_patches_and_images():
    items = [{"image": f"t{i}", "label": 1} for i in range(10)] + [{"image": f"b{i}", "label": 0} for i in range(40)]
    same, k = background_plan(items, bg_ratio=1, num_patches=8, mode="patches")
    assert same == items and k == 2  # 10 x 8 target patches = 40 x 2 background patches
    _, k4 = background_plan(items, bg_ratio=4, num_patches=8)
    assert k4 == 8
    out, k = background_plan(items, bg_ratio=2, num_patches=8, mode="images")
    assert k == 8 and sum(it["label"] == 1 for it in out) == 10 and sum(it["label"] == 0 for it in out) == 20
    few = [{"image": "t", "label": 1}] * 6 + [{"image": "b", "label": 0}] * 2
    out, _ = background_plan(few, bg_ratio=2, mode="images")
    assert sum(it["label"] == 0 for it in out) == 12  # background repeated 6 times
    with pytest.raises(ValueError, match="target and background"):
        background_plan(items[:10], 1)


def test_boxes_to_mask_keeps_only_the_named_labels():
    d = {"image": torch.zeros(1, 20, 20), "boxes": np.array([[0, 0, 5, 5], [10, 10, 20, 20]], dtype=float),
         "box_labels": ["fracture", "normal_region"]}
    m = BoxesToMaskd(box_labels=["fracture"])(d)["box_mask"]
    assert float(m.sum()) == 25
    assert float(BoxesToMaskd()(d)["box_mask"].sum()) == 125
    with pytest.raises(ValueError, match="2 boxes but 1 'box_labels'"):
        BoxesToMaskd(box_labels=["fracture"])({**d, "box_labels": ["fracture"]})
