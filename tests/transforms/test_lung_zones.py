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


@pytest.mark.real_data
def test_real_v7_masks_give_six_zones():
    """Every V7 lung mask of the Brixia-scored images (255 = lung; 127 markup excluded) at 256 px: the zone map has
    the six zones, each lung's upper zone lies above its lower zone, and image-left zones are left of image-right."""
    import os

    from monai.transforms import Resize

    from cutremain_monai.io.importers import import_brixia
    from cutremain_monai.io.loader import load_xray
    from cutremain_monai.transforms import LungMask
    from tests.conftest import shared_data

    root = shared_data("covid")
    items = import_brixia(os.path.join(root, "manifest.csv"), root)
    ok, failed = 0, []
    for it in items:
        mask = Resize((256, 256), mode="nearest")(LungMask()(load_xray(it["lung_mask"]).as_tensor()))
        try:
            z = split_lung_zones(mask)
        except LungZoneError as e:
            failed.append((os.path.basename(it["lung_mask"]), str(e)))
            continue
        assert set(np.unique(z)) == {0, 1, 2, 3, 4, 5, 6}
        rows = {k: np.nonzero(z == k)[0].mean() for k in range(1, 7)}
        cols = {k: np.nonzero(z == k)[1].mean() for k in range(1, 7)}
        assert rows[1] < rows[2] < rows[3] and rows[4] < rows[5] < rows[6]
        assert cols[1] < cols[4]
        lung = np.asarray(mask[0]) > 0
        assert not (z > 0)[~lung].any()  # zones only inside the lung
        assert (z > 0).sum() >= 0.95 * lung.sum()  # all of it but specks outside the two largest components
        ok += 1
    assert ok >= 0.9 * len(items), failed  # the rest are named (single merged lung without a midline gap)
