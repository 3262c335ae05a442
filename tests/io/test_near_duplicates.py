"""Near-duplicate grouping: fingerprints survive resizing / recompression / contrast changes, different images stay
apart, groups merge through union-find, splits keep copies together, the CLI writes its pairs report."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from cutremain_monai.io import near_duplicates as nd
from cutremain_monai.io.datalist import split_by_group
from tests.conftest import SHARED_DATA


def _radiograph(seed, size=300):
    """A smooth random 'anatomy' with fine structure, 8-bit."""
    rng = np.random.default_rng(seed)
    a = gaussian_filter(rng.normal(size=(size, size)), 6) + 0.3 * gaussian_filter(rng.normal(size=(size, size)), 1.5)
    a = (a - a.min()) / (a.max() - a.min())
    return (a * 255).astype(np.uint8)


@pytest.fixture
def files(tmp_path):
    base = _radiograph(0)
    paths = {}
    paths["a"] = tmp_path / "a.png"
    Image.fromarray(base).save(paths["a"])
    # the same radiograph: resized, brighter and flatter, saved as JPEG
    copy = np.clip(base.astype(float) * 0.7 + 40, 0, 255).astype(np.uint8)
    paths["a_copy"] = tmp_path / "a_copy.jpg"
    Image.fromarray(copy).resize((220, 220), Image.LANCZOS).save(paths["a_copy"], quality=80)
    paths["a_inverted"] = tmp_path / "a_inverted.png"
    Image.fromarray(255 - base).save(paths["a_inverted"])
    paths["b"] = tmp_path / "b.png"
    Image.fromarray(_radiograph(1)).save(paths["b"])
    paths["broken"] = tmp_path / "broken.png"
    paths["broken"].write_bytes(b"not a png")
    return {k: str(v) for k, v in paths.items()}


def test_thumbnail_is_unit_and_invariant_to_linear_intensity():
    img = _radiograph(3).astype(np.float32) / 255
    t = nd.thumbnail(img)
    assert t.shape == (nd.THUMB * nd.THUMB,) and abs(float(np.linalg.norm(t)) - 1) < 1e-5
    np.testing.assert_allclose(nd.thumbnail(img * 0.5 + 0.2), t, atol=1e-5)
    assert not nd.thumbnail(np.full((50, 40), 0.3)).any()  # constant image: zeros, matches nothing
    with pytest.raises(ValueError, match="2D image"):
        nd.thumbnail(np.zeros((2, 3, 4, 5)))


def test_pairs_find_copies_not_other_images(files):
    items = [{"image": files[k]} for k in ("a", "a_copy", "a_inverted", "b")]
    thumbs, read, bad = nd.fingerprints(items)
    assert read == [0, 1, 2, 3] and bad == []
    r = thumbs @ thumbs.T
    assert r[0, 1] > 0.98 and r[0, 2] < -0.99 and abs(r[0, 3]) < 0.3  # by hand: the dot products of unit rows
    pairs = nd.near_duplicate_pairs(thumbs)
    assert {(i, j) for i, j, _ in pairs} == {(0, 1), (0, 2), (1, 2)}
    assert all(abs(r[i, j] - v) < 1e-6 for i, j, v in pairs)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        nd.near_duplicate_pairs(thumbs, threshold=1.5)


def test_blocks_give_the_full_answer(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16))
    x[7] = x[3] + 0.01 * rng.normal(size=16)
    x[41] = -x[12]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    full = nd.near_duplicate_pairs(x, threshold=0.9)
    monkeypatch.setattr(nd, "_BLOCK", 8)
    assert nd.near_duplicate_pairs(x, threshold=0.9) == full
    assert {(i, j) for i, j, _ in full} == {(3, 7), (12, 41)}
    cross = nd.near_duplicate_pairs(x[:20], x[40:], threshold=0.9)
    assert [(i, j) for i, j, _ in cross] == [(12, 1)] and cross[0][2] == pytest.approx(-1.0)
    monkeypatch.setattr(nd, "_BLOCK", 4096)
    assert nd.near_duplicate_pairs(x[:20], x[40:], threshold=0.9) == cross


def test_merge_groups_and_split_keeps_copies_together(files):
    items = [
        {"image": files["a"], "group": "p3"},
        {"image": files["a_copy"], "group": "p1"},
        {"image": files["b"], "group": "p2"},
        {"image": files["broken"], "group": "p4"},
        {"image": files["a_inverted"]},  # no group: its path is its group
    ]
    merged, pairs, bad = nd.merge_near_duplicate_groups(items)
    assert [it["group"] for it in merged][:4] == ["p1", "p1", "p2", "p4"]
    assert merged[4]["group"] == "p1"
    assert items[0]["group"] == "p3"  # the input is not modified
    assert len(bad) == 1 and bad[0][0] == files["broken"] and "cannot identify image file" in bad[0][1]
    assert {(p["image_a"], p["image_b"]) for p in pairs} == {("a.png", "a_copy.jpg"), ("a.png", "a_inverted.png"),
                                                             ("a_copy.jpg", "a_inverted.png")}
    for seed in range(5):
        split = split_by_group(merged, seed=seed)
        where = {os.path.basename(it["image"]): s for s, its in split.items() for it in its}
        assert where["a.png"] == where["a_copy.jpg"] == where["a_inverted.png"]


def test_drop_near_duplicates_of(files):
    pool = [{"image": files[k]} for k in ("a_copy", "b", "broken")]
    kept, left_out = nd.drop_near_duplicates_of(pool, [{"image": files["a"]}])
    assert [os.path.basename(it["image"]) for it in kept] == ["b.png", "broken.png"]  # unreadable kept for later
    assert left_out[0][0] == files["a_copy"] and left_out[0][1].startswith("near-duplicate of held-out image a.png (r=")
    assert nd.drop_near_duplicates_of(pool, []) == (pool, [])


@pytest.mark.real_data
@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "covid")), reason="../shared/data absent")
def test_cli_import_groups_real_copies(tmp_path):
    """The Cohen collection holds the same radiograph under other patient ids; the import merges their groups."""
    from cutremain_monai.cli import main

    out = str(tmp_path / "lungseg.json")
    assert main(["import", "lungmasks", os.path.join(SHARED_DATA, "covid", "lungseg_extra", "manifest.csv"),
                 "-o", out]) == 0
    with open(tmp_path / "lungseg.near_duplicates.csv") as f:
        pairs = list(csv.DictReader(f))
    names = {frozenset((p["image_a"], p["image_b"])) for p in pairs}
    assert frozenset(("353889E0-A1E8-4F9E-A0B8-F24F36BCFBFB.png", "case_72_RX-TORACE1.png")) in names
    assert all(float(p["r"]) >= 0.95 for p in pairs)
    with open(out) as f:
        datalist = json.load(f)
    where = {os.path.basename(it["image"]): (s, it["group"]) for s in ("training", "validation", "test")
             for it in datalist[s]}
    for p in pairs:
        assert where[p["image_a"]] == where[p["image_b"]]  # same section, same group
    # off: the copies keep their own patient groups
    main(["import", "lungmasks", os.path.join(SHARED_DATA, "covid", "lungseg_extra", "manifest.csv"),
          "-o", str(tmp_path / "plain.json"), "--near-duplicates", "0"])
    with open(tmp_path / "plain.json") as f:
        plain = json.load(f)
    groups = {os.path.basename(it["image"]): it["group"] for s in plain.values() if isinstance(s, list) for it in s}
    assert groups["353889E0-A1E8-4F9E-A0B8-F24F36BCFBFB.png"] != groups["case_72_RX-TORACE1.png"]
    assert not os.path.exists(tmp_path / "plain.near_duplicates.csv")
