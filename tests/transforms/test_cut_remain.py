import logging
import os

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, list_data_collate
from monai.transforms import Compose, EnsureTyped, LoadImaged

from cutremain_monai.data.collate import box_list_data_collate
from cutremain_monai.io import XrayDicomReader, load_datalist
from cutremain_monai.transforms import BoxesToMaskd, CutRemain, CutRemaind, aspect_ratio_boxes, boxes_to_mask, gamma_selected
from tests.conftest import SAMPLES


def sample(h=40, w=50, boxes=((10, 5, 20, 15),), name="img_a.dcm"):
    from monai.data import MetaTensor

    img = MetaTensor(torch.arange(h * w, dtype=torch.float32).reshape(1, h, w) + 1, meta={"filename_or_obj": name})
    return {"image": img, "label": 1, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4)}


def test_exact_pixels_all_nine():
    d = sample()
    out = CutRemaind(keys="image")(d)
    assert len(out) == 10 and out[0]["image"] is d["image"]
    assert [o["augmented"] for o in out] == [0] + [1] * 9
    variants = aspect_ratio_boxes([10, 5, 20, 15], image_size=(40, 50))
    for o, (x0, y0, x1, y1) in zip(out[1:], variants):
        img = o["image"][0].numpy()
        ref = d["image"][0].numpy()
        inside = np.zeros_like(img, bool)
        inside[int(np.ceil(y0 - .5)):int(np.ceil(y1 - .5)), int(np.ceil(x0 - .5)):int(np.ceil(x1 - .5))] = True
        np.testing.assert_array_equal(img[inside], ref[inside])  # position and scale kept
        assert (img[~inside] == 0).all()
        assert o["label"] == 1 and o["boxes"] is d["boxes"]
    # first variant is the box itself: exactly rows 5:15, cols 10:20
    assert (out[1]["image"][0] != 0).sum() == 100


def test_union_fill_and_k():
    d = sample(boxes=((0, 0, 5, 5), (30, 30, 40, 35)))
    t = CutRemaind(keys="image", factors=(1.0,), fill_value=-1.0)
    (orig, copy) = t(d)
    img = copy["image"][0].numpy()
    ref = d["image"][0].numpy()
    assert (img[:5, :5] == ref[:5, :5]).all() and (img[30:35, 30:40] == ref[30:35, 30:40]).all()
    assert (img == -1).sum() == 40 * 50 - 25 - 50
    t = CutRemaind(keys="image", num_copies=3).set_random_state(7)
    a = [o["image"] for o in t(d)]
    t.set_random_state(7)
    b = [o["image"] for o in t(d)]
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b))  # seeded replay
    drawn = {tuple(t.cutter._variants) for _ in range(20) if t(d)}
    assert len(drawn) > 1 and all(len(v) == 3 for v in drawn)


def test_no_boxes_and_bad_input(caplog):
    d = sample(boxes=())
    assert len(CutRemaind()(d)) == 1
    with pytest.raises(KeyError, match="missing box key 'boxes'"):
        CutRemaind()({"image": torch.zeros(1, 4, 4)})
    assert len(CutRemaind(allow_missing_keys=True)({"image": torch.zeros(1, 4, 4)})) == 1
    with pytest.raises(ValueError, match=r"'boxes' must have shape \(N, 4\)"):
        CutRemaind()({"image": torch.zeros(1, 4, 4), "boxes": np.zeros((1, 5))})
    with pytest.raises(ValueError, match=r"'image' must be a channel-first \(C, H, W\) array, got shape \(4, 4\)"):
        CutRemaind()({"image": torch.zeros(4, 4), "boxes": np.zeros((1, 4))})
    with caplog.at_level(logging.WARNING):
        out = CutRemaind(factors=(1.0,))(sample(boxes=((40, 30, 60, 50), (70, 70, 80, 80))))
    assert len(out) == 2 and "img_a.dcm" in caplog.text and "clipped" in caplog.text and "outside" in caplog.text
    assert (out[1]["image"][0, 30:40, 40:50] != 0).all()


def test_array_transform_numpy():
    img = np.ones((2, 8, 8), np.float32)
    copies = CutRemain(factors=(1.0, 2.0))(img, [[2, 2, 4, 4]])
    assert len(copies) == 4 and copies[0].sum() == 2 * 4 and copies[-1].sum() == 2 * 16


def test_gamma_fraction_stability_and_nesting():
    ids = [f"patient_{i}/img.dcm" for i in range(4000)]
    for gamma in (0.0, 0.2, 0.4, 1.0):
        chosen = [gamma_selected(i, gamma, seed=3) for i in ids]
        assert abs(np.mean(chosen) - gamma) < 3 * np.sqrt(gamma * (1 - gamma) / len(ids)) + 1e-9
        assert chosen == [gamma_selected(i, gamma, seed=3) for i in ids]  # same every epoch
    small = {i for i in ids if gamma_selected(i, 0.2, 3)}
    large = {i for i in ids if gamma_selected(i, 0.6, 3)}
    assert small <= large
    t = CutRemaind(gamma=0.4, seed=3)
    lens = [len(t(sample(name=i))) for i in ids[:200]]
    assert lens == [len(t(sample(name=i))) for i in ids[:200]]  # second epoch: the same samples
    assert set(lens) == {1, 10}
    with pytest.raises(ValueError, match="gamma"):
        CutRemaind(gamma=1.5)


def test_dataloader_list_data_collate_on_dicom_samples():
    items = load_datalist(os.path.join(SAMPLES, "datalist.json"), "training", task="clavicle")[:6]
    for it in items:
        it["boxes"] = np.asarray(it["boxes"], np.float32)
    pre = Compose([
        LoadImaged("image", reader=XrayDicomReader()),
        EnsureTyped("image"),
        CutRemaind("image", num_copies=2),
        BoxesToMaskd("boxes"),
    ])
    ds = Dataset(items, transform=pre)
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=box_list_data_collate)))
    assert len(batch["boxes"]) == batch["image"].shape[0]  # boxes kept per sample, not stacked
    n_boxed = sum(1 for it in items[:3] if len(it["boxes"]))
    assert batch["image"].shape[0] == 3 + 2 * n_boxed == len(batch["label"])
    assert tuple(batch["image"].shape[1:]) == (1, 128, 128)
    copies = (batch["augmented"] == 1).nonzero().flatten()
    assert len(copies) == 2 * n_boxed
    boxed = [it for it in items[:3] if len(it["boxes"])]
    for j, i in enumerate(copies.tolist()):
        box = boxed[j // 2]["boxes"][0]
        largest = boxes_to_mask([aspect_ratio_boxes(box, image_size=(128, 128))[-1]], (128, 128))
        kept = batch["image"][i, 0].numpy() != 0
        assert kept.any() and not (kept & ~largest).any()  # nothing kept beyond the 2x2 variant of the box
        inner = batch["box_mask"][i, 0].numpy() > 0
        orig = batch["image"][i - 1 - (j % 2), 0].numpy()  # the original precedes its copies
        np.testing.assert_array_equal(batch["image"][i, 0].numpy()[inner], orig[inner])


def test_list_data_collate_flattens():
    d = sample()
    out = list_data_collate([CutRemaind(num_copies=2)(d), CutRemaind()(sample())])
    assert out["image"].shape[0] == 4 + 9 and out["augmented"].tolist() == [0, 1, 1, 0] + [1] * 9
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        list_data_collate([CutRemaind()(d), CutRemaind()(sample(boxes=()))])  # boxes of different counts
    out = box_list_data_collate([CutRemaind(num_copies=2)(d), CutRemaind()(sample(boxes=()))])
    assert out["image"].shape[0] == 4 and [len(b) for b in out["boxes"]] == [1, 1, 1, 0]
