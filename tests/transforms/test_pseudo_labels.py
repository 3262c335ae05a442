"""Label maps of pseudo-masks in the training chain: 8-bit PNG round trip through LoadXrayd, the default map of an
item without one, the bank of refreshed maps (checkpointable) and its transform, which CacheDataset must not cache."""

import numpy as np
import pytest
import torch
from monai.data import CacheDataset
from monai.transforms import Compose
from PIL import Image

from cutremain_monai.constants import IGNORE_LABEL
from cutremain_monai.transforms import ApplyPseudoLabelsd, DefaultLabelMapd, LabelMapd, PseudoLabelBank


def _png(tmp_path, values, name="m.png"):
    path = tmp_path / name
    Image.fromarray(np.asarray(values, np.uint8)).save(path)
    return str(path)


def test_label_map_is_read_with_its_stored_integers(tmp_path):
    values = np.array([[0, 1, 255], [2, 0, 1]])
    out = LabelMapd(num_classes=2)({"seg_label": _png(tmp_path, values)})["seg_label"]
    assert out.shape == (1, 2, 3)
    np.testing.assert_array_equal(np.asarray(out)[0], values)
    # a map of background and ignore only stays that (a [0, 1] scaling would make 255 a class)
    only = LabelMapd()({"seg_label": _png(tmp_path, [[0, 255]], "bg_ignore.png")})["seg_label"]
    np.testing.assert_array_equal(np.asarray(only)[0], [[0, 255]])
    np.save(tmp_path / "m.npy", np.array([[0, 1], [1, 0]]))
    np.testing.assert_array_equal(np.asarray(LabelMapd()({"seg_label": str(tmp_path / "m.npy")})["seg_label"])[0], [[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=r"bad.png: field 'seg_label' holds \[3.0\]"):
        LabelMapd(num_classes=2)({"seg_label": _png(tmp_path, [[3, 0]], "bad.png")})
    with pytest.raises(ValueError, match="missing.png: field 'seg_label' cannot be read"):
        LabelMapd()({"seg_label": str(tmp_path / "missing.png")})


def test_default_label_map_from_the_image_label():
    image = torch.zeros(1, 3, 4)
    assert (DefaultLabelMapd()({"image": image, "label": 0})["seg_label"] == 0).all()
    pos = DefaultLabelMapd()({"image": image, "label": 1})["seg_label"]
    assert pos.shape == (1, 3, 4) and (pos == IGNORE_LABEL).all()
    assert "seg_label" not in DefaultLabelMapd()({"image": image})  # inference: no label, no map
    kept = torch.ones(1, 3, 4)
    assert DefaultLabelMapd()({"image": image, "label": 1, "seg_label": kept})["seg_label"] is kept


def test_bank_state_round_trip_and_apply():
    bank = PseudoLabelBank()
    bank.update("a.png", np.array([[0, 1], [255, 0]]))
    bank.refreshes = 2
    other = PseudoLabelBank()
    other.load_state_dict(bank.state_dict())
    assert "a.png" in other and other.refreshes == 2 and other.get("a.png").dtype == torch.uint8
    t = ApplyPseudoLabelsd(bank=other)
    out = t({"seg_label": torch.zeros(1, 2, 2), "image_path": "a.png"})["seg_label"]
    np.testing.assert_array_equal(out[0].numpy(), [[0, 1], [255, 0]])
    same = torch.zeros(1, 2, 2)
    assert t({"seg_label": same, "image_path": "b.png"})["seg_label"] is same
    with pytest.raises(ValueError, match="network's input size"):
        t({"seg_label": torch.zeros(1, 3, 3), "image_path": "a.png"})
    with pytest.raises(ValueError, match="needs the bank"):
        ApplyPseudoLabelsd()


def test_cache_dataset_sees_a_refresh_made_after_caching():
    bank = PseudoLabelBank()
    chain = Compose([DefaultLabelMapd(), ApplyPseudoLabelsd(bank=bank)])
    ds = CacheDataset([{"image": torch.zeros(1, 2, 2), "label": 1, "image_path": "x"}], transform=chain, progress=False)
    assert (ds[0]["seg_label"] == IGNORE_LABEL).all()
    bank.update("x", np.ones((2, 2)))
    assert (ds[0]["seg_label"] == 1).all()


def test_datalist_resolves_seg_label_paths_and_rejects_a_non_path(tmp_path):
    import json

    from cutremain_monai.io.datalist import DatalistError, load_datalist

    (tmp_path / "maps").mkdir()
    _png(tmp_path / "maps", [[0, 1]], "a.png")
    dl = tmp_path / "d.json"
    dl.write_text(json.dumps({"training": [{"image": "a.png", "label": 1, "seg_label": "maps/a.png"}]}))
    item = load_datalist(str(dl), "training")[0]
    assert item["seg_label"] == str(tmp_path / "maps" / "a.png")
    np.testing.assert_array_equal(np.asarray(LabelMapd()(item)["seg_label"])[0], [[0, 1]])
    dl.write_text(json.dumps({"training": [{"image": "a.png", "label": 1, "seg_label": 3}]}))
    with pytest.raises(DatalistError, match="seg_label"):
        load_datalist(str(dl), "training")
