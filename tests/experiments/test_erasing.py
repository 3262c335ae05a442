"""Adversarial-erasing region mining: the region / erase / box rules against hand computations, and the rounds
runner end to end on the synthetic clavicle phantoms at tiny settings."""

import csv
import json
import os

import numpy as np
import pytest
import torch

from cutremain_monai.localization.erasing import erase, mined_boxes, top_region
from tests.bundles.conftest import BUNDLES, TINY, tiny_datalist
from tests.conftest import mlflow_db


def test_top_region_q_and_delta():
    cam = np.arange(20, dtype=float).reshape(4, 5)  # min-max: value v -> v / 19
    r = top_region(cam, q=0.2)  # ceil(0.2 * 20) = 4 largest: 16..19
    assert r.sum() == 4 and r[3, 1:].all() and not r[3, 0]
    r = top_region(cam, delta=15 / 19)  # >= 15/19: 15..19
    assert r.sum() == 5 and r[3].all()
    tied = np.zeros((4, 5))
    tied[0, :3] = 1.0  # three tied maxima; q = 0.1 -> k = 2, but ties are kept whole
    assert top_region(tied, q=0.1).sum() == 3
    assert not top_region(np.full((3, 3), 7.0), q=0.5).any()  # a constant map has no region
    with pytest.raises(ValueError, match="q must be"):
        top_region(cam, q=0)


def test_erase_fills_a_copy():
    img = torch.ones(1, 3, 3)
    region = np.zeros((3, 3), dtype=bool)
    region[1, 1:] = True
    out = erase(img, region, 0.25)
    assert float(out.sum()) == 7 + 2 * 0.25 and float(img.sum()) == 9  # input unchanged
    assert erase(np.ones((1, 3, 3)), region, 0.0).sum() == 7


def test_mined_boxes_largest_first_in_pixel_edges():
    region = np.zeros((10, 12), dtype=bool)
    region[2:5, 3:7] = True  # 12 pixels: rows 2..4, columns 3..6 -> x0 3, y0 2, x1 7, y1 5
    region[7:9, 9:12] = True  # 6 pixels, touching the right border -> x1 12
    region[0, 0] = True  # 1 pixel, below min_area
    np.testing.assert_array_equal(mined_boxes(region, max_boxes=3, min_area=2), [[3, 2, 7, 5], [9, 7, 12, 9]])
    np.testing.assert_array_equal(mined_boxes(region), [[3, 2, 7, 5]])
    assert mined_boxes(np.zeros((4, 4), bool)).shape == (0, 4)


@pytest.mark.slow
def test_rounds_end_to_end_on_phantoms(tmp_path):
    from cutremain_monai.experiments.erasing import adversarial_erasing

    data = tiny_datalist(tmp_path, "clavicle")
    out = tmp_path / "erase"
    rows = adversarial_erasing(os.path.join(BUNDLES, "clavicle_fracture"), data, str(out), rounds=2, q=0.2,
                               max_auc_drop=1.0, **{**TINY, "cam_images": 0},
                               tracking_uri=mlflow_db(tmp_path, "m.db"))
    assert [r["round"] for r in rows] == [1, 2] and all(r["used"] for r in rows)
    assert 0 < rows[0]["mined_share"] <= rows[1]["mined_share"] <= 1  # the union only grows
    train = json.load(open(data))["training"]
    positives = [it for it in train if it["label"] == 1]
    mined = json.load(open(out / "mined_datalist.json"))["training"]
    assert len(mined) == len(train)
    for it, orig in zip(mined, train):
        assert it.get("mined", False) == (orig["label"] == 1)  # only positives are erased and mined
    from PIL import Image

    from cutremain_monai.io.loader import load_xray

    for it in (m for m in mined if m.get("mined")):
        mask = np.asarray(Image.open(it["mined_mask"])) > 0
        assert mask.shape == tuple(load_xray(it["image"]).shape[-2:])
        x0, y0, x1, y1 = it["boxes"][0]
        assert it["box_labels"] == ["fracture"] and mask[int(y0):int(y1), int(x0):int(x1)].any()
        # the erased image of round 2 holds the fill value exactly where round 1 mined
    fill = np.mean([load_xray(it["image"]).numpy().mean() for it in train])  # pixel-weighted = mean (same sizes)
    erased_dir = out / "images" / "round2"
    assert len(list(erased_dir.glob("*.png"))) == len(positives)
    with open(out / "erasing_rounds.csv") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["1", "2"]
    first = sorted(erased_dir.glob("*.png"))[0]
    img = np.asarray(Image.open(first), dtype=np.float64) / 65535
    round2_dl = json.load(open(out / "round2" / "datalist.json"))["training"]
    assert any(it["image"] == str(first) for it in round2_dl)
    assert np.isclose(img, fill, atol=1e-4).any()
