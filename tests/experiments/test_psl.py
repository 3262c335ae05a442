"""AE-PSL end to end on the synthetic clavicle phantoms (`cutremain experiment psl`): erasing, pseudo-masks, PSL
and PSL + SEC, one localisation table; bounds are against chance (the energy a uniform map puts in the boxes), and
a second call reuses every finished step."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.bundles.conftest import BUNDLES, tiny_datalist

CLS = {"image_size": [64, 64], "network_depth": 10, "epochs": 8, "batch_size": 8, "num_workers": 0, "cam_images": 0}
SEG = {"image_size": [64, 64], "network_depth": 10, "epochs": 8, "batch_size": 8, "refresh_start": 4, "refresh_every": 2}


def _chance(items) -> float:
    """Mean share of a boxed positive test image covered by its fracture boxes (a uniform map's energy in box)."""
    from cutremain_monai.io.loader import load_xray

    shares = []
    for it in items:
        if it["label"] != 1:
            continue
        h, w = load_xray(it["image"]).shape[-2:]
        m = np.zeros((h, w), bool)
        for (x0, y0, x1, y1), lab in zip(it["boxes"], it["box_labels"]):
            if lab == "fracture":
                m[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
        if m.any():
            shares.append(m.mean())
    return float(np.mean(shares))


@pytest.mark.slow
def test_psl_experiment_on_phantoms(tmp_path):
    from cutremain_monai.experiments.psl import psl_experiment

    dl = tiny_datalist(tmp_path, "clavicle", n=(72, 24, 24))
    out = tmp_path / "psl"
    table = psl_experiment(os.path.join(BUNDLES, "clavicle_fracture"), os.path.join(BUNDLES, "lesion_segmentation"), dl,
                           str(out), rounds=2, cls_overrides=CLS, seg_overrides=SEG)
    assert list(table) == ["cam", "erasing_union", "psl", "psl_sec"]
    assert {t["n"] for t in table.values()} == {12}  # the 12 fractured test phantoms, all boxed
    # pseudo-masks: one per positive training image, values 0 / 1 / 255, lesion pixels present
    pm = json.load(open(out / "pseudo_masks" / "datalist.json"))
    positives = [it for it in pm["training"] if it["label"] == 1]
    assert positives and all("seg_label" in it for it in positives)
    assert not any("seg_label" in it for it in pm["training"] if it["label"] == 0)
    values = set(np.unique(np.asarray(Image.open(positives[0]["seg_label"]))).tolist())
    assert values <= {0, 1, 255} and 1 in values and 0 in values
    rows = list(csv.DictReader(open(out / "pseudo_masks" / "pseudo_masks.csv")))
    assert len(rows) == len(positives)
    assert all(abs(float(r["lesion"]) + float(r["background"]) + float(r["ignore"]) - 1) < 1e-3 for r in rows)
    # against chance: a uniform map's energy in box
    chance = _chance(pm["test"])
    assert 0.02 < chance < 0.1
    # Where the maps fall is not bounded at this size: 72 training images and 8 epochs leave the classifier at the
    # edge of learning the lesion, and the float order decides. Measured 2026-12-08 on the same code: with one
    # thread per process (as under pytest -n 2 on 2 cores) CAM 0.055, erasing union 0.023, PSL 0.025 against a
    # chance of 0.050; with two threads all above it; 12 epochs did not make it hold either (union 0.034). The
    # localisation comparison is the docs' run (dicom_samples/datalist.json: union 0.077, PSL 0.146, PSL + SEC
    # 0.036 against 0.050). Here: every method scored on the same 12 images, with scores in range.
    assert all(0 <= t["energy_in_box"] <= 1 and 0 <= t["pointing_game"] <= 1 for t in table.values())
    text = open(out / "psl_localization_table.md").read()
    assert all(f"| {m} |" in text for m in table) and "from validation" in text
    assert len(os.listdir(out / "psl_localization_overlays")) == 8
    # a second call reuses the erasing rounds, the pseudo-masks and both trainings
    stamps = {p: os.path.getmtime(out / p) for p in ("psl/done.json", "psl_sec/done.json", "pseudo_masks/datalist.json")}
    again = psl_experiment(os.path.join(BUNDLES, "clavicle_fracture"), os.path.join(BUNDLES, "lesion_segmentation"), dl,
                           str(out), rounds=2, cls_overrides=CLS, seg_overrides=SEG)
    assert {p: os.path.getmtime(out / p) for p in stamps} == stamps
    assert again["psl"]["energy_in_box"] == pytest.approx(table["psl"]["energy_in_box"])
    with pytest.raises(ValueError, match="other settings"):  # a folder made with other settings is not reused
        psl_experiment(os.path.join(BUNDLES, "clavicle_fracture"), os.path.join(BUNDLES, "lesion_segmentation"), dl,
                       str(out), rounds=2, q=0.3, cls_overrides=CLS, seg_overrides=SEG)
    rows = list(csv.DictReader(open(out / "pseudo_masks" / "pseudo_masks.csv")))
    assert all(0 < float(r["body"]) <= 1 for r in rows)


def test_psl_refuses_a_multilabel_bundle(tmp_path):
    from cutremain_monai.experiments.psl import psl_experiment

    dl = tiny_datalist(tmp_path, "chest", n=(2, 2, 2))
    with pytest.raises(ValueError, match="binary bundles"):
        psl_experiment(os.path.join(BUNDLES, "cxr14"), os.path.join(BUNDLES, "lesion_segmentation"), dl, str(tmp_path / "o"))
