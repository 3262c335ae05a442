import csv
import json
import os

import numpy as np
import pytest
import torch

from cutremain_monai.cli import main as cli_main
from cutremain_monai.experiments.cross_validation import summarise
from cutremain_monai.experiments.feature_similarity import augmentation_pairs
from cutremain_monai.io.datalist import load_datalist
from tests.bundles.conftest import BUNDLES, TINY, tiny_datalist
from tests.conftest import SAMPLES, mlflow_db


def test_summarise_mean_std():
    rows = [{"augmentation": "none", "auc": a, "f1": 0.5, "accuracy": 0.5, "cam_energy_in_box": 0.1} for a in (0.6, 0.8)]
    rows.append({"augmentation": "cut_remain", "auc": 0.9, "f1": 1.0, "accuracy": 1.0, "cam_energy_in_box": None})
    table = summarise(rows, ["none", "cut_remain"])
    assert table["rows"][0][1] == pytest.approx(0.7) and table["rows"][0][2] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert "| none | 0.700 ± 0.141 |" in table["markdown"]
    assert np.isnan(table["rows"][1][7])


def test_augmentation_pairs_on_samples():
    items = load_datalist(os.path.join(SAMPLES, "datalist.json"), "validation", task="clavicle")[:6]
    pairs = augmentation_pairs(os.path.join(BUNDLES, "clavicle_fracture"), items, "cut_remain", (64, 32))
    assert pairs and all(a.shape == b.shape == (1, 64, 32) for a, b in pairs)
    assert all(not torch.equal(a, b) for a, b in pairs)
    assert all((b == 0).float().mean() > 0.3 for _, b in pairs)  # a Cut&Remain copy is mostly fill


@pytest.mark.slow
def test_cv_command_on_a_tiny_setting(tmp_path):
    out = tmp_path / "cv"
    overrides = {**TINY, "epochs": 1, "cam_images": 1, "tracking_uri": mlflow_db(tmp_path, "cv.db")}
    data = tiny_datalist(tmp_path, n=(8, 4, 4))
    rc = cli_main(["experiment", "cv", "--bundle", os.path.join(BUNDLES, "clavicle_fracture"), "--datalist",
                   data, "--task", "clavicle", "--folds", "2", "--augmentations",
                   "none,cut_remain", "--overrides", json.dumps({**overrides, "num_copies": 1}), "-o", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "cv_results.csv")))
    assert len(rows) == 4 and {r["augmentation"] for r in rows} == {"none", "cut_remain"}
    assert sum(int(r["n"]) for r in rows if r["augmentation"] == "none") == 2 * 16  # every image (2 halves) tested once
    table = open(out / "cv_table.md").read()
    assert table.startswith("| augmentation | AUC-ROC |") and "| cut_remain |" in table
    for k in range(2):  # held-out fold never in its training or validation data
        fold = json.load(open(out / f"fold{k}_datalist.json"))
        held = {i["group"] for i in fold["test"]}
        assert not held & {i["group"] for s in ("training", "validation") for i in fold[s]}
