import os

import numpy as np
import pytest
import torch

from cutremain_monai.io import load_datalist, read_xray_dicom
from cutremain_monai.transforms import HideAndSeekd, dataset_mean
from tests.conftest import SAMPLES


def test_hidden_patches_take_the_mean():
    img = torch.rand(2, 64, 70)
    t = HideAndSeekd(mean=[0.25, 0.75], grid_sizes=(16,), prob=0.5).set_random_state(0)
    out = t({"image": img})["image"]
    hidden = torch.from_numpy(t.hider.hidden_mask((64, 70)))
    assert 0 < hidden.float().mean() < 1
    assert (out[0][hidden] == 0.25).all() and (out[1][hidden] == 0.75).all()
    assert torch.equal(out[:, ~hidden], img[:, ~hidden])
    # hidden regions are whole 16x16 grid cells (the last column of cells is 6 px wide)
    grid = t.hider._hidden
    assert grid.shape == (4, 5)
    for gy in range(4):
        for gx in range(5):
            cell = hidden[gy * 16:(gy + 1) * 16, gx * 16:(gx + 1) * 16]
            assert bool(cell.all()) == bool(grid[gy, gx]) and bool(cell.any()) == bool(grid[gy, gx])


def test_grid_size_draw_zero_and_replay():
    img = torch.rand(1, 32, 32)
    t = HideAndSeekd(mean=0.5, grid_sizes=(0, 8), prob=1.0).set_random_state(1)
    seen = set()
    for _ in range(40):
        out = t({"image": img})["image"]
        seen.add(t.hider._grid)
        if t.hider._grid == 0:
            assert torch.equal(out, img)
        else:
            assert (out == 0.5).all()  # prob 1 hides every patch
    assert seen == {0, 8}
    t.set_random_state(9)
    a = t({"image": img})["image"]
    t.set_random_state(9)
    assert torch.equal(a, t({"image": img})["image"])
    with pytest.raises(ValueError, match="prob"):
        HideAndSeekd(prob=2)
    with pytest.raises(ValueError, match=r"image must be \(C, H, W\)"):
        HideAndSeekd()({"image": torch.zeros(4, 4)})


def test_dataset_mean_matches_numpy():
    items = load_datalist(os.path.join(SAMPLES, "datalist.json"), "validation", task="pelvis")
    expected = np.mean([read_xray_dicom(it["image"])[0].astype(np.float64).mean() for it in items])  # same sizes
    assert dataset_mean(items) == pytest.approx(expected, rel=1e-9)
    assert dataset_mean([np.ones((1, 2, 2)), np.zeros((1, 2, 6))]) == pytest.approx(4 / 16)


def test_dataset_mean_is_on_the_training_scale(tmp_path):
    """PNG / JPEG used to come in as 0-255: the mean must be that of what training loads, in [0, 1]."""
    from PIL import Image

    from cutremain_monai.io.dx_writer import write_dx
    from cutremain_monai.io.loader import load_xray

    png8 = np.array([[0, 51, 255], [102, 204, 153]], np.uint8)  # /255: 0, .2, 1, .4, .8, .6 -> sum 3.0
    Image.fromarray(png8).save(tmp_path / "a.png")
    png16 = np.array([[0, 65535], [13107, 52428]], np.uint16)  # /65535: 0, 1, .2, .8 -> sum 2.0
    Image.fromarray(png16).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode.startswith("I")
    stored = np.array([[0, 819, 4095], [1638, 3276, 2457]], np.uint16)  # /4095: 0, .2, 1, .4, .8, .6 -> sum 3.0
    # window (2048, 4096), LINEAR: y = (x - 2047.5) / 4095 + 0.5 = x / 4095
    write_dx(tmp_path / "c.dcm", stored, bits_stored=12, window=(2048, 4096))
    write_dx(tmp_path / "d.dcm", stored, bits_stored=12, window=(2048, 4096), photometric="MONOCHROME1",
             uid_seed="d")  # inverted: 1 - x / 4095 -> sum 6 - 3.0 = 3.0
    items = [{"image": str(tmp_path / n)} for n in ("a.png", "b.png", "c.dcm", "d.dcm")]
    expected = (3.0 + 2.0 + 3.0 + 3.0) / (6 + 4 + 6 + 6)
    assert dataset_mean(items) == pytest.approx(expected, abs=1e-6)
    assert dataset_mean(items[:1]) == pytest.approx(0.5, abs=1e-6)  # 127.5 before, on the 0-255 scale
    assert dataset_mean(items[2:3]) == pytest.approx(0.5, abs=1e-6)
    # the same as averaging what the training loader gives
    loaded = [load_xray(i["image"]) for i in items]
    assert dataset_mean(items) == pytest.approx(float(sum(t.double().sum() for t in loaded)) / sum(t.numel() for t in loaded))
    assert dataset_mean([tmp_path / "a.png"]) == pytest.approx(0.5, abs=1e-6)  # os.PathLike items too
