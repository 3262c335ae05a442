"""``cutremain experiment premise`` at a tiny setting (issue 28): two methods over two training seeds on the
subtle-lesion phantoms' own split, the gamma curve on one seed; numbers against scikit-learn, DeLong and scipy's t
interval from the runs' own prediction files; resume."""

import csv
import json
import os

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from cutremain_monai.cli import main as cli_main
from cutremain_monai.data.phantoms import generate_subtle_samples
from cutremain_monai.metrics.comparison import delong_paired
from tests.bundles.conftest import BUNDLES, TINY


def _probs(run):
    with open(os.path.join(run, "test_predictions.csv")) as f:
        return {r["file"]: float(r["probability"]) for r in csv.DictReader(f)}


@pytest.mark.slow
def test_premise_end_to_end(tmp_path):
    generate_subtle_samples(str(tmp_path / "data"), 24, size=64, contrast=0.3)
    out = tmp_path / "premise"
    overrides = {**TINY, "split_halves": False, "lesion_box_labels": ["lesion"], "cam_images": 0, "num_copies": 1,
                 "localization_report": False}
    args = ["experiment", "premise", "--bundle", os.path.join(BUNDLES, "clavicle_fracture"), "--datalist",
            str(tmp_path / "data" / "datalist.json"), "--task", "subtle", "--methods", "none,cut_remain", "--seeds",
            "0,1", "--gammas", "0,0.5,1", "--overrides", json.dumps(overrides), "-o", str(out)]
    assert cli_main(args) == 0
    summary = json.load(open(out / "premise_summary.json"))
    test = json.load(open(tmp_path / "data" / "datalist.json"))["subtle"]["test"]
    label = {os.path.join(str(tmp_path / "data"), it["image"]): it["label"] for it in test}
    rows = {r["method"]: r for r in summary["methods"]}
    diffs = []
    for seed in (0, 1):
        p = {m: _probs(out / "runs" / f"seed{seed}" / m) for m in ("none", "cut_remain")}
        names = sorted(label)
        y = [label[n] for n in names]
        for m in p:
            assert rows[m]["seeds"][seed]["auc"] == pytest.approx(roc_auc_score(y, [p[m][n] for n in names]))
        d = delong_paired(y, [p["cut_remain"][n] for n in names], [p["none"][n] for n in names])
        assert rows["cut_remain"]["seeds"][seed]["difference"] == pytest.approx(d["difference"])
        assert rows["cut_remain"]["seeds"][seed]["p"] == pytest.approx(d["p"])
        diffs.append(d["difference"])
    half = stats.t.ppf(0.975, 1) * np.std(diffs, ddof=1) / np.sqrt(2)
    r = rows["cut_remain"]
    assert r["difference"] == pytest.approx(np.mean(diffs))
    assert (r["difference_low"], r["difference_high"]) == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half))
    assert r["positive_seeds"] == sum(x > 0 for x in diffs)
    # the gamma curve: 0 is seed 0's none run, 1 its cut_remain run, 0.5 a run of its own (seed 0 only)
    assert [(g["gamma"], g["run"]) for g in summary["gamma"]] == [
        (0.0, os.path.join("runs", "seed0", "none")), (0.5, os.path.join("runs", "seed0", "cut_remain@gamma0.50")),
        (1.0, os.path.join("runs", "seed0", "cut_remain"))]
    assert not (out / "runs" / "seed1" / "cut_remain@gamma0.50").exists()
    table = open(out / "premise_table.md").read()
    assert "| cut_remain |" in table and "difference to none" in table and "| 0.50 |" in table
    # resume: nothing is trained again
    stamps = {p: os.path.getmtime(p) for p in out.glob("runs/*/*/result.json")}
    assert len(stamps) == 5
    assert cli_main(args) == 0
    assert {p: os.path.getmtime(p) for p in out.glob("runs/*/*/result.json")} == stamps
    # a finished run of other settings is refused, not mixed in
    other = {**overrides, "epochs": overrides["epochs"] + 1}
    with pytest.raises(ValueError, match="other settings \\(epochs\\)"):
        cli_main([*args[:-3], json.dumps(other), "-o", str(out)])
    # what the cut_remain model says of Cut&Remain copies of the test images' relevant areas, by label
    from cutremain_monai.experiments.premise import copy_scores

    c = copy_scores(os.path.join(BUNDLES, "clavicle_fracture"), str(out / "runs" / "seed0" / "cut_remain"),
                    str(tmp_path / "data" / "datalist.json"), task="subtle", box_labels=["relevant_area"], **overrides)
    negatives = sum(1 for it in test if not it["label"])
    assert c["n_normal_originals"] == negatives and c["n_normal_copies"] == 9 * negatives  # all 9 variants
    p0 = _probs(out / "runs" / "seed0" / "cut_remain")
    assert c["normal_originals"] == pytest.approx(np.mean([p0[n] for n in label if not label[n]]), abs=1e-3)
    assert 0 <= c["normal_copies"] <= 1 and 0 <= c["copies_auc"] <= 1
    with pytest.raises(ValueError, match="pairs every method with 'none'"):
        cli_main([*args[:9], "cut_remain", *args[10:]])
