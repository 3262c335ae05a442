import numpy as np
import pytest
import torch

from cutremain_monai.transforms import SupCutmixd, SupCutoutd, SupMixupd
from cutremain_monai.transforms.boxes import boxes_to_mask


def batch(labels, b=4, h=12, w=10):
    images = torch.stack([torch.full((1, h, w), float(i + 1)) for i in range(b)])
    images = images + torch.linspace(0, 0.5, h * w).reshape(1, 1, h, w)
    masks = torch.zeros(b, 1, h, w)
    masks[0, 0, 2:6, 1:5] = 1  # 16 px
    masks[1, 0, 0:12, 0:5] = 1  # 60 px
    masks[2, 0, 5:8, 5:10] = 1  # 15 px; sample 3 has no box
    return {"image": images, "label": torch.as_tensor(labels), "box_mask": masks}


LABELS = {
    "binary": [1.0, 0.0, 1.0, 0.0],
    "multiclass": [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]],
    "multilabel": [[1.0, 0, 1.0, 0], [0, 1.0, 1.0, 0], [0, 0, 0, 1.0], [1.0, 1.0, 0, 0]],
}


@pytest.mark.parametrize("kind", list(LABELS))
def test_cutmix_paper_rule(kind):
    d = batch(LABELS[kind])
    t = SupCutmixd().set_random_state(0)
    out = t(dict(d))
    tgt, prt = t.mixer._targets, t.mixer._partners
    assert sorted(tgt.tolist()) == [0, 1, 2]  # sample 3 (no box) is neither mixed nor a partner
    assert 3 not in prt.tolist()
    for a, b in zip(tgt.tolist(), prt.tolist()):
        m = d["box_mask"][a] > 0
        expected = torch.where(m, d["image"][a], d["image"][b])
        assert torch.equal(out["image"][a], expected)
    assert torch.equal(out["image"][3], d["image"][3])
    assert torch.equal(out["label"], d["label"])  # y~ = y_A


@pytest.mark.parametrize("kind", list(LABELS))
def test_cutmix_area_rule(kind):
    d = batch(LABELS[kind])
    t = SupCutmixd(label_rule="area").set_random_state(1)
    out = t(dict(d))
    areas = {0: 16 / 120, 1: 60 / 120, 2: 15 / 120}
    y = d["label"].float()
    for a, b in zip(t.mixer._targets.tolist(), t.mixer._partners.tolist()):
        lam = areas[a]
        torch.testing.assert_close(out["label"][a], lam * y[a] + (1 - lam) * y[b])
    torch.testing.assert_close(out["label"][3], y[3])


@pytest.mark.parametrize("kind", list(LABELS))
def test_mixup_rule(kind):
    d = batch(LABELS[kind])
    t = SupMixupd(alpha=0.4).set_random_state(2)
    out = t(dict(d))
    lam = t.mixer._lam
    assert 0 < lam < 1
    m = d["box_mask"] > 0
    y = d["label"].float()
    for a, b in zip(t.mixer._targets.tolist(), t.mixer._partners.tolist()):
        expected = lam * d["image"][a] * m[a] + (1 - lam) * d["image"][b] * m[b]
        torch.testing.assert_close(out["image"][a], expected)
        torch.testing.assert_close(out["label"][a], lam * y[a] + (1 - lam) * y[b])
        # the mixed image's mask (what guided training keeps relevance in) is the union of both boxes
        torch.testing.assert_close(out["box_mask"][a], torch.maximum(d["box_mask"][a], d["box_mask"][b]))
    unmixed = [i for i in range(len(d["image"])) if i not in t.mixer._targets.tolist()]
    for i in unmixed:
        assert torch.equal(out["box_mask"][i], d["box_mask"][i])
    t.set_random_state(2)
    again = t(dict(d))
    assert torch.equal(again["image"], out["image"])  # seeded replay
    draws = []
    for _ in range(200):
        t(dict(d))
        draws.append(t.mixer._lam)
    assert abs(np.mean(draws) - 0.5) < 0.06  # Beta(a, a) is symmetric about 0.5


@pytest.mark.parametrize("cls", [SupMixupd, SupCutmixd])
def test_prob_mixes_each_boxed_sample_with_that_probability(cls):
    d = batch(LABELS["binary"])
    # prob 1 draws what the transform drew before the option: (Mixup: lambda first) one permutation of the boxed
    # samples from the seeded numpy stream, nothing more
    t1 = cls(prob=1.0).set_random_state(5)
    t1(dict(d))
    ref = np.random.RandomState(5)
    if cls is SupMixupd:
        ref.beta(1.0, 1.0)
    assert t1.mixer._targets.tolist() == [0, 1, 2]
    assert t1.mixer._partners.tolist() == np.array([0, 1, 2])[ref.permutation(3)].tolist()
    assert t1.mixer.R.random() == ref.random()  # the two streams are at the same point afterwards
    assert cls(prob=0.0).set_random_state(0)(dict(d))["image"].equal(d["image"])  # nothing mixed
    t = cls(prob=0.3).set_random_state(1)
    mixed = []
    for _ in range(400):
        out = t(dict(d))
        targets = t.mixer._targets.tolist()
        assert 3 not in targets and 3 not in t.mixer._partners.tolist()  # never the box-less sample
        for i in range(4):
            if i not in targets:  # an unchosen sample passes unchanged, image and label
                assert torch.equal(out["image"][i], d["image"][i]) and out["label"][i] == d["label"][i]
        for i, j in zip(targets, t.mixer._partners.tolist()):  # a chosen one is mixed with its drawn partner
            m = d["box_mask"] > 0
            if cls is SupCutmixd:
                expected = torch.where(m[i], d["image"][i], d["image"][j])
            else:
                lam = t.mixer._lam
                expected = lam * d["image"][i] * m[i] + (1 - lam) * d["image"][j] * m[j]
            torch.testing.assert_close(out["image"][i], expected)
        mixed.append(len(targets))
    assert abs(np.mean(mixed) / 3 - 0.3) < 0.05  # 3 boxed samples, each chosen with probability 0.3
    with pytest.raises(ValueError, match=r"prob must be in \[0, 1\], got 1.5"):
        cls(prob=1.5)


def test_no_box_full_and_errors():
    d = batch(LABELS["binary"])
    t = SupCutmixd(no_box="full").set_random_state(0)
    t(dict(d))
    assert sorted(t.mixer._targets.tolist()) == [0, 1, 2, 3]
    with pytest.raises(KeyError, match="missing key 'box_mask'"):
        SupCutmixd()({"image": d["image"], "label": d["label"]})
    with pytest.raises(ValueError, match=r"'box_mask' must have shape \(4, 1, 12, 10\), got \(4, 12, 10\)"):
        SupMixupd()({"image": d["image"], "label": d["label"], "box_mask": d["box_mask"][:, 0]})
    with pytest.raises(ValueError, match="'label' must be a tensor with batch size 4"):
        SupMixupd()({"image": d["image"], "label": torch.zeros(3), "box_mask": d["box_mask"]})


def test_sup_cutout_never_touches_box():
    img = torch.rand(1, 50, 60) + 1
    boxes = np.asarray([[10, 10, 30, 25]], np.float32)
    inside = torch.from_numpy(boxes_to_mask(boxes, (50, 60)))[None]
    t = SupCutoutd(size=(0.3, 0.6)).set_random_state(0)
    changed_any = False
    for _ in range(50):
        out = t({"image": img, "boxes": boxes})["image"]
        assert torch.equal(out[inside], img[inside])
        changed = out != img
        changed_any |= bool(changed.any())
        assert (out[changed] == 0).all()
    assert changed_any
    t.set_random_state(5)
    a = t({"image": img, "boxes": boxes})["image"]
    t.set_random_state(5)
    assert torch.equal(a, t({"image": img, "boxes": boxes})["image"])


def test_sup_cutout_centre_outside_box():
    t = SupCutoutd(size=(0.1, 0.1)).set_random_state(1)
    boxes = np.asarray([[0, 0, 90, 100]], np.float32)  # box covers 90% of the width
    for _ in range(30):
        t({"image": torch.ones(1, 100, 100), "boxes": boxes})
        r0, r1, c0, c1 = t.cutout._rect
        assert (c0 + c1) / 2 >= 85  # centre drawn in the 10 free columns


@pytest.mark.parametrize("cls", [SupCutmixd, SupMixupd])
def test_body_mask_follows_the_mixed_image(cls):
    """The body mask (guided training's foreground with guidance_mask: body_mask) of a mixed sample covers the
    pixels the mixed image takes from a source where that source's body mask is on, and nothing else."""
    d = batch(LABELS["binary"])
    body = torch.zeros(4, 1, 12, 10)
    for i in range(4):
        body[i, 0, 1 + i:11, 0:8 - i] = 1  # a different body per sample, covering part of each box
    d["body_mask"] = body
    t = cls().set_random_state(3)
    out = t(dict(d))
    box = d["box_mask"] > 0
    targets = t.mixer._targets.tolist()
    assert targets
    for a, b in zip(targets, t.mixer._partners.tolist()):
        if cls is SupCutmixd:  # A's box from A, the rest from B
            expected = torch.where(box[a], body[a], body[b])
        else:  # only the two boxes show: where either box meets its own body
            expected = torch.maximum(body[a] * box[a], body[b] * box[b])
        assert torch.equal(out["body_mask"][a], expected), (a, b)
        assert set(out["body_mask"][a].unique().tolist()) <= {0.0, 1.0}
    for i in set(range(4)) - set(targets):
        assert torch.equal(out["body_mask"][i], body[i])
    no_follow = cls(mask_follow_keys=()).set_random_state(3)(dict(d))
    assert torch.equal(no_follow["body_mask"], body) and torch.equal(no_follow["image"], out["image"])


def test_mixup_mask_union_only_for_mixed_samples():
    """With no_box="full" a box-less sample is mixed as a whole image; with prob < 1 an unmixed one keeps its own
    (empty) box mask, so guided training does not treat it as boxed."""
    d = batch(LABELS["binary"])
    t = SupMixupd(no_box="full", prob=0.5).set_random_state(0)
    for _ in range(50):
        out = t(dict(d))
        targets = set(t.mixer._targets.tolist())
        for i in range(4):
            if i not in targets:
                assert torch.equal(out["box_mask"][i], d["box_mask"][i])
        if 3 in targets:  # the box-less sample mixed: its mask is the whole image
            assert out["box_mask"][3].min() == 1
