import numpy as np
import pytest
import torch

from cutremain_monai.transforms.lung_zones import LungZoneError, LungZonesd, split_lung_zones


def two_lungs(h=60, w=50):
    m = np.zeros((h, w), np.uint8)
    m[10:46, 5:20] = 1  # image-left lung: rows 10..45 -> height 35
    m[22:59, 28:45] = 1  # image-right lung: rows 22..58 -> height 36
    return m


def test_cut_rows_hand_computed():
    z = split_lung_zones(two_lungs())
    # left lung: top 10, bottom 45: cuts at 10 + 35 * 5/12 = 24.58 and 10 + 35 * 2/3 = 33.33
    assert (z[10:25, 5:20] == 1).all() and (z[25:34, 5:20] == 2).all() and (z[34:46, 5:20] == 3).all()
    # right lung: top 22, bottom 58: cuts at 22 + 15 = 37 and 22 + 24 = 46
    assert (z[22:37, 28:45] == 4).all() and (z[37:46, 28:45] == 5).all() and (z[46:59, 28:45] == 6).all()
    assert (z[two_lungs() == 0] == 0).all()


def test_merged_lungs_split_at_midline_gap():
    m = two_lungs()
    m[30:33, 20:28] = 1  # a bridge joins them into one component
    z = split_lung_zones(m)
    assert set(np.unique(z[:, :20])) <= {0, 1, 2, 3} and set(np.unique(z[:, 28:])) <= {0, 4, 5, 6}


def test_errors_and_flag():
    one = np.zeros((40, 40), np.uint8)
    one[5:30, 5:15] = 1
    with pytest.raises(LungZoneError, match="mask.png: .*single lung"):
        LungZonesd(keys="lung_mask")({"lung_mask": one, "lung_mask_path": "mask.png"})
    out = LungZonesd(keys="lung_mask", on_error="flag")({"lung_mask": torch.zeros(1, 40, 40)})
    assert out["zones_ok"] is False and int(out["zones"].sum()) == 0
    with pytest.raises(LungZoneError, match="empty"):
        split_lung_zones(np.zeros((10, 10)))
