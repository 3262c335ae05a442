"""The shortcut test, small: a burned-in tag marks every positive in training and validation and is independent of
the label in test. Loose bounds that a method either meets or not (the full table is in the clavicle docs)."""

import csv

import pytest

from tests.bundles.conftest import BUNDLES


@pytest.mark.slow
def test_baseline_reads_the_tag_and_isnet_moves_relevance_off_it(tmp_path):
    from cutremain_monai.experiments.shortcut import shortcut_experiment

    rows = shortcut_experiment(f"{BUNDLES}/clavicle_fracture", str(tmp_path / "sc"), methods=("none", "isnet_free"), n=100,
                               size=96, epochs=14, warmup_epochs=2, seed=0, network_depth=10, num_workers=0)
    assert [(row["method"], row["checkpoint"]) for row in rows] == [("none", "best val"), ("none", "last"), ("isnet_free", "best val"), ("isnet_free", "last")]
    r = {row["method"]: row for row in rows if row["checkpoint"] == "last"}
    base, isnet = r["none"], r["isnet_free"]
    # the baseline learns the tag: perfect on validation (tag = label), much worse where the tag is independent
    assert base["validation_auc"] > 0.9 and base["test_auc"] < base["validation_auc"] - 0.25
    assert base["tag_auc"] > 0.9  # its test predictions follow the tag
    # ISNet's own objective: less LRP relevance on the tag than the baseline's
    assert isnet["lrp_tag_energy"] < base["lrp_tag_energy"]
    written = list(csv.DictReader(open(tmp_path / "sc" / "shortcut_results.csv")))
    assert [w["method"] for w in written] == ["none", "none", "isnet_free", "isnet_free"]
    assert "| none | last |" in open(tmp_path / "sc" / "shortcut_table.md").read()
