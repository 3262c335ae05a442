import glob
import json
import os

import numpy as np
import pydicom
import pytest

from cutremain_monai.data.phantoms import burn_marker, generate_samples, generate_shortcut_samples
from cutremain_monai.io.datalist import load_datalist
from cutremain_monai.io.dicom import read_xray_dicom
from cutremain_monai.io.gsps import read_gsps_boxes
from tests.conftest import SAMPLES, dciodvfy_errors, dcmpschk_ok

SMALL = {"clavicle": 4, "pelvis": 3, "chest": 3, "covid": 2}


def test_deterministic_and_valid(tmp_path):
    a = generate_samples(str(tmp_path / "a"), seed=5, counts=SMALL)
    b = generate_samples(str(tmp_path / "b"), seed=5, counts=SMALL)
    assert json.dumps(a) == json.dumps(b)
    for f in sorted(glob.glob(str(tmp_path / "a" / "*" / "*.dcm"))):
        other = f.replace(os.sep + "a" + os.sep, os.sep + "b" + os.sep)
        assert open(f, "rb").read() == open(other, "rb").read(), f  # byte-identical, presentation states too
        assert dciodvfy_errors(f) == [], f
        if f.endswith("_gsps.dcm"):
            ok, text = dcmpschk_ok(f)
            assert ok, text
    c = generate_samples(str(tmp_path / "c"), seed=6, counts=SMALL)
    assert json.dumps(c["clavicle"]) != json.dumps(a["clavicle"])


def test_committed_samples_are_consistent():
    path = os.path.join(SAMPLES, "datalist.json")
    if not os.path.exists(path):
        pytest.fail("dicom_samples/datalist.json is missing: run `make samples`")
    syntaxes, photometrics = set(), set()
    for task in ("clavicle", "pelvis", "chest", "covid"):
        items = [it for s in ("training", "validation", "test") for it in load_datalist(path, s, task=task)]
        assert items
        for it in items:
            ds = pydicom.dcmread(it["image"], stop_before_pixels=True)
            syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
            photometrics.add(ds.PhotometricInterpretation)
            assert ds.Modality == "DX" and 12 <= ds.BitsStored <= 16
            if it["boxes"]:  # the GSPS holds the same boxes as the datalist
                found = read_gsps_boxes(pydicom.dcmread(it["gsps"]))[ds.SOPInstanceUID]
                np.testing.assert_allclose([b for b, _ in found], it["boxes"], atol=0.01)
                assert [lab for _, lab in found] == it["box_labels"]
            if task == "covid":
                assert len(it["zone_scores"]) == 6 and os.path.exists(it["lung_mask"])
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert len(syntaxes) >= 3 and "1.2.840.10008.1.2.1" in syntaxes


def test_clavicle_fracture_is_inside_its_box():
    """The lesion signal lives in the box: fractured and normal images differ most inside it."""
    items = load_datalist(os.path.join(SAMPLES, "datalist.json"), "training", task="clavicle")
    frac = [it for it in items if it["label"] == 1][:3]
    for it in frac:
        img = read_xray_dicom(it["image"])[0][0]
        x0, y0, x1, y1 = (int(round(v)) for v in it["boxes"][0])
        inside = img[y0:y1, x0:x1]
        # the gap is darker than the clavicle band around it: a real dip in the box
        assert inside.max() - inside.min() > 0.15


def test_phantom_lung_zone_maps():
    from cutremain_monai.data.phantoms import phantom_lung_zone_maps
    from cutremain_monai.transforms.lung_zones import split_lung_zones

    maps = phantom_lung_zone_maps(3, 96, seed=4)
    assert maps.shape == (3, 96, 96) and maps.dtype == np.uint8
    for m in maps:
        assert set(np.unique(m).tolist()) == set(range(7))
        np.testing.assert_array_equal(split_lung_zones(m > 0), m)  # the zoning of its own lung mask
    assert not np.array_equal(maps[0], maps[1])  # jittered per map
    np.testing.assert_array_equal(phantom_lung_zone_maps(3, 96, seed=4), maps)  # seeded


def test_shortcut_set_tags_positives_in_training_and_is_independent_in_test(tmp_path):
    dl = generate_shortcut_samples(str(tmp_path), n=60, seed=1, size=96)["shortcut"]
    assert [len(dl[s]) for s in ("training", "validation", "test")] == [36, 12, 12]
    for section in ("training", "validation"):
        assert all(it["marker"] == bool(it["label"]) for it in dl[section])
    test = dl["test"]
    for label in (0, 1):  # half of each label's test images tagged: the tag is independent of the label there
        assert sum(it["marker"] for it in test if it["label"] == label) == sum(it["label"] == label for it in test) // 2
    for section in ("training", "validation", "test"):
        for it in dl[section]:
            x0, y0, x1, y1 = it["marker_box"]
            for bx0, by0, bx1, by1 in it["boxes"]:  # the tag lies outside every box
                assert x0 >= bx1 or y0 >= by1 or x1 <= bx0 or y1 <= by0
            img = np.squeeze(read_xray_dicom(os.path.join(str(tmp_path), it["image"]))[0])
            tag = img[int(y0):int(y1), int(x0):int(x1)]
            assert (tag.max() > 0.9) == it["marker"], it["image"]  # the letter is burned in where marked
    assert dciodvfy_errors(os.path.join(str(tmp_path), test[0]["image"])) == []


def test_shortcut_strengths_differ_only_in_the_training_tags(tmp_path):
    """tag_rate: the share of training / validation positives that carry the tag (0: the clean reference set); the
    images without a tag, the split and the whole test section are the same at every strength."""
    sets = {rate: generate_shortcut_samples(str(tmp_path / str(rate)), n=40, seed=2, size=64, tag_rate=rate)["shortcut"]
            for rate in (1.0, 0.5, 0.0)}
    with pytest.raises(ValueError, match="tag_rate must be in"):
        generate_shortcut_samples(str(tmp_path / "bad"), n=4, tag_rate=1.5)
    for s in ("training", "validation"):  # the share is exact: round(0.5 N) of each section's N positives
        pos = [it for it in sets[0.5][s] if it["label"]]
        assert sum(it["marker"] for it in pos) == round(0.5 * len(pos)) and 0 < round(0.5 * len(pos)) < len(pos)
    assert not any(it["marker"] for s in ("training", "validation") for it in sets[0.0][s])
    assert not any(it["marker"] and not it["label"] for s in ("training", "validation") for it in sets[0.5][s])

    def pixels(rate, it):
        return np.squeeze(read_xray_dicom(os.path.join(str(tmp_path / str(rate)), it["image"]))[0])

    for section in ("training", "validation", "test"):
        for a, b, c in zip(sets[1.0][section], sets[0.5][section], sets[0.0][section]):
            assert a["image"] == b["image"] == c["image"] and a["boxes"] == b["boxes"] == c["boxes"]
            if section == "test":
                assert a["marker"] == b["marker"] == c["marker"]
            if not b["marker"]:  # an untagged image is the clean image
                np.testing.assert_array_equal(pixels(0.5, b), pixels(0.0, c))
            if b["marker"]:  # a tag drawn at 0.5 is drawn at 1.0 too
                assert a["marker"]
                np.testing.assert_array_equal(pixels(0.5, b), pixels(1.0, a))


def test_burn_marker_by_hand():
    img = np.zeros((40, 40), dtype=np.float32)
    out, box = burn_marker(img, scale=1, margin=2)
    assert box == [31.0, 29.0, 38.0, 38.0]  # 5 x 7 glyph + 1-pixel plate border, 2 pixels from the corner
    assert out[30, 32] == pytest.approx(0.95) and out[30, 36] == pytest.approx(0.55)  # glyph pixel / plate pixel
    assert out[:29].max() == 0 and out[:, :31].max() == 0 and img.max() == 0  # nothing else touched, input kept


def test_subtle_family_label_only_in_the_small_lesion(tmp_path):
    """The subtle-lesion phantoms (issue 28): deterministic; every image has its relevant-area box, positives a
    lesion box inside it covering at most 2% of the image; the burned-in marker is on both classes alike;
    relevant_boxes=False keeps the lesion boxes only (as FracAtlas)."""
    import numpy as np

    from cutremain_monai.data.phantoms import burn_marker, generate_subtle_samples, render_subtle

    a = render_subtle(np.random.default_rng(3), 96, lesion=True)
    b = render_subtle(np.random.default_rng(3), 96, lesion=True)
    np.testing.assert_array_equal(a.image, b.image)
    items = []
    for i in range(80):
        ph = render_subtle(np.random.default_rng([7, i]), 96, lesion=bool(i % 2))
        assert ph.box_labels == (["relevant_area", "lesion"] if i % 2 else ["relevant_area"])
        ra = ph.boxes[0]
        if i % 2:
            les = ph.boxes[1]
            assert (les[2] - les[0]) * (les[3] - les[1]) <= 0.02 * 96 * 96
            cx, cy = (les[0] + les[2]) / 2, (les[1] + les[3]) / 2
            assert ra[0] <= cx <= ra[2] and ra[1] <= cy <= ra[3]
        _, tag = burn_marker(ph.image, scale=1)
        x0, y0, x1, y1 = (int(v) for v in tag)
        items.append((ph.label, bool((ph.image[y0 + 1:y1 - 1, x0 + 1:x1 - 1] >= 0.94).any())))
    marked = {lab: np.mean([m for label, m in items if label == lab]) for lab in (0, 1)}
    assert 0.25 < marked[0] < 0.75 and 0.25 < marked[1] < 0.75  # the marker says nothing about the label
    dl = generate_subtle_samples(str(tmp_path), 10, size=64, relevant_boxes=False)["subtle"]
    assert all(it["box_labels"] == (["lesion"] if it["label"] else []) for s in dl.values() for it in s)
    assert sum(len(s) for s in dl.values()) == 10 and (tmp_path / dl["training"][0]["image"]).exists()


def test_shortcut_region_box_is_the_anatomy_and_changes_no_pixel(tmp_path):
    """Every image's first box is the relevant area around both clavicles (ISNet's foreground, as the lungs are in
    its references): it holds the lesion's centre, misses the tag, and the images are those of a set without it."""
    with_region = generate_shortcut_samples(str(tmp_path / "r"), n=30, seed=3, size=64)
    without = generate_shortcut_samples(str(tmp_path / "l"), n=30, seed=3, size=64, region_boxes=False)
    assert with_region["region_boxes"] is True and without["region_boxes"] is False
    for section in ("training", "validation", "test"):
        for a, b in zip(with_region["shortcut"][section], without["shortcut"][section]):
            assert a["box_labels"] == ["relevant_area", *b["box_labels"]] and a["boxes"][1:] == b["boxes"]
            x0, y0, x1, y1 = a["boxes"][0]
            lx0, ly0, lx1, ly1 = b["boxes"][0]
            assert x0 <= (lx0 + lx1) / 2 <= x1 and y0 <= (ly0 + ly1) / 2 <= y1
            assert 0.1 < (x1 - x0) * (y1 - y0) / 64 ** 2 < 0.4  # a band across the upper chest, not the image
            np.testing.assert_array_equal(np.squeeze(read_xray_dicom(os.path.join(str(tmp_path / "r"), a["image"]))[0]),
                                          np.squeeze(read_xray_dicom(os.path.join(str(tmp_path / "l"), b["image"]))[0]))
