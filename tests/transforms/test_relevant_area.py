"""Relevant-area boxes for unboxed images (issue 28): body mask, lesion size fractions, the per-image draw, and the
bundle switch (training head only, labelled relevant_area, never a lesion)."""

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from PIL import Image

from cutremain_monai.transforms import RELEVANT_AREA, BodyMaskd, RelevantAreaBoxesd, body_mask, lesion_box_fractions
from cutremain_monai.transforms.relevant_area import relevant_area_boxes


def _xray(h=120, w=160, seed=0):
    """Dark background, a bright ellipse (the body) with texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    body = ((xx - 90) / 50.0) ** 2 + ((yy - 60) / 40.0) ** 2 < 1
    img = 0.05 + 0.02 * rng.random((h, w)) + body * (0.5 + 0.1 * rng.random((h, w)))
    return img.astype(np.float32), body


def test_body_mask_finds_the_body():
    img, body = _xray()
    mask = body_mask(img)
    iou = (mask & body).sum() / (mask | body).sum()
    assert iou > 0.97
    assert body_mask(np.full((10, 10), 0.3)).all()  # a flat image: everything


def test_lesion_box_fractions_from_the_headers(tmp_path):
    for name, (h, w) in {"a.png": (100, 200), "b.png": (50, 50)}.items():
        Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / name)
    items = [{"image": str(tmp_path / "a.png"), "boxes": [[10, 10, 50, 30], [0, 0, 20, 20]],
              "box_labels": ["fracture", "relevant_area"]},
             {"image": str(tmp_path / "b.png"), "boxes": [[0, 0, 25, 10]], "box_labels": ["fracture"]},
             {"image": str(tmp_path / "b.png"), "boxes": [], "box_labels": []}]
    assert lesion_box_fractions(items, ["fracture"]) == [[0.2, 0.2], [0.5, 0.2]]
    assert len(lesion_box_fractions(items)) == 3


def test_unboxed_image_gets_a_deterministic_box_in_the_body():
    img, body = _xray()
    t = RelevantAreaBoxesd(keys="image", fractions=[[0.1, 0.2]], num_boxes=3, seed=5)
    d = t({"image": torch.as_tensor(img)[None], "image_id": "IMG1.jpg", "label": 0, "boxes": [], "box_labels": []})
    boxes = d["boxes"]
    assert boxes.shape == (3, 4) and d["box_labels"] == [RELEVANT_AREA] * 3 and d["label"] == 0
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], 16.0)  # 0.1 x 160
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], 24.0)  # 0.2 x 120
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 120).all()
    for x0, y0, x1, y1 in boxes:  # the centre is a body pixel (up to the shift that keeps a box inside)
        assert body[int((y0 + y1) / 2), int((x0 + x1) / 2)]
    again = t({"image": torch.as_tensor(img)[None], "image_id": "IMG1.jpg"})
    np.testing.assert_array_equal(again["boxes"], boxes)  # the same image, the same boxes
    other = t({"image": torch.as_tensor(img)[None], "image_id": "IMG2.jpg"})
    assert not np.array_equal(other["boxes"], boxes)
    boxed = {"image": torch.as_tensor(img)[None], "boxes": [[1, 2, 3, 4]], "box_labels": ["fracture"]}
    assert t(boxed)["boxes"] == [[1, 2, 3, 4]]  # an image with its own box is left alone
    assert RelevantAreaBoxesd(keys="image", enabled=False)({"image": torch.zeros(1, 4, 4)}).get("boxes") is None


def test_a_given_mask_places_the_centres():
    img, _ = _xray()
    lung = np.zeros_like(img)
    lung[10:20, 10:30] = 1
    t = RelevantAreaBoxesd(keys="image", fractions=[[0.05, 0.05]], num_boxes=5, mask_key="lung_mask")
    d = t({"image": torch.as_tensor(img)[None], "lung_mask": torch.as_tensor(lung)[None], "image_id": "x"})
    cx, cy = (d["boxes"][:, 0] + d["boxes"][:, 2]) / 2, (d["boxes"][:, 1] + d["boxes"][:, 3]) / 2
    assert ((cx >= 10) & (cx <= 30) & (cy >= 10) & (cy <= 20)).all()


def test_boxes_fit_even_when_larger_than_the_image():
    rng = np.random.default_rng(0)
    boxes = relevant_area_boxes(np.ones((20, 30), bool), [[2.0, 2.0]], rng, 2)
    np.testing.assert_array_equal(boxes, [[0, 0, 30, 20]] * 2)
    with pytest.raises(ValueError, match="num_boxes"):
        RelevantAreaBoxesd(num_boxes=0)


def test_bundle_switch_boxes_normal_training_halves_only(tmp_path):
    """clavicle_fracture with relevant_area_boxes: normal training halves get a relevant_area box (label unchanged),
    validation keeps its own boxes, and the relevant-area box is not a lesion for the localisation report."""
    from cutremain_monai.engines.bundle import bundle_parser
    from cutremain_monai.localization.report import lesion_boxes
    from tests.bundles.conftest import BUNDLES, TINY, tiny_datalist

    dl = tiny_datalist(tmp_path)
    parser = bundle_parser(f"{BUNDLES}/clavicle_fracture", ["train.yaml", "cpu.yaml"], **TINY, datalist=dl,
                           datalist_task=None, relevant_area_boxes=True, augmentation="none",
                           output_dir=str(tmp_path / "out"))
    head = parser.get_parsed_content("train#head")
    items = parser.get_parsed_content("train#items")
    normal = next(it for it in items if it["label"] in (0, [0]))
    normal = dict(normal, boxes=[], box_labels=[])  # as FracAtlas: a normal image has no box
    halves = Compose(head)(normal)
    for h in halves:
        assert RELEVANT_AREA in list(h["box_labels"]) and int(h["label"]) == 0
        assert float(h["box_mask"].sum()) > 0
        assert len(lesion_boxes(h, {"fracture"})) == 0  # never a lesion
    val_head = Compose(parser.get_parsed_content("head_transforms"))
    val = next(it for it in parser.get_parsed_content("validate#items") if it["label"] in (0, [0]))
    assert all(RELEVANT_AREA not in list(h.get("box_labels", [])) for h in val_head(dict(val, boxes=[], box_labels=[])))
    ds = parser.get_parsed_content("train#dataset")
    assert ds.cache.fingerprint != parser.get_parsed_content("validate#dataset").cache.fingerprint


def test_body_mask_transform_leaves_a_marker_in_the_air_out():
    img, body = _xray()
    img[5:15, 5:15] = 0.9  # a lead marker letter, outside the body
    d = BodyMaskd(keys="image")({"image": torch.as_tensor(img)[None], "label": 1})
    m = d["body_mask"]
    assert m.shape == (1, 120, 160) and m.dtype == np.float32 and set(np.unique(m)) == {0.0, 1.0}
    assert m[0, 5:15, 5:15].sum() == 0 and ((m[0] > 0) & body).sum() / ((m[0] > 0) | body).sum() > 0.97
    assert "body_mask" not in BodyMaskd(keys="image", enabled=False)({"image": torch.as_tensor(img)[None]})


@pytest.mark.parametrize("guidance", ["none", "isnet"])
def test_bundle_body_mask_guidance_foreground(tmp_path, guidance):
    """guidance_mask body_mask: every training and validation sample carries the body mask at the training size (the
    guided step's foreground), also where it has no box; not computed for unguided runs."""
    from cutremain_monai.engines.bundle import bundle_parser
    from tests.bundles.conftest import BUNDLES, TINY, tiny_datalist

    parser = bundle_parser(f"{BUNDLES}/clavicle_fracture", ["train.yaml", "cpu.yaml"], **TINY, datalist=tiny_datalist(tmp_path),
                           datalist_task=None, guidance=guidance, guidance_mask="body_mask", output_dir=str(tmp_path / "out"))
    head = Compose(parser.get_parsed_content("head_transforms"))
    item = dict(parser.get_parsed_content("validate#items")[0], boxes=[], box_labels=[])
    for s in (head(item) if isinstance(head(item), list) else [head(item)]):
        if guidance == "none":
            assert "body_mask" not in s
        else:
            m = np.asarray(s["body_mask"])
            assert m.shape == tuple(s["image"].shape) and 0 < m.mean() < 1
            np.testing.assert_array_equal(m[0], body_mask(np.asarray(s["image"])[0]))
