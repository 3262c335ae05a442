"""Severity settings chosen by CV on the dev data (`cutremain experiment severity-cv`), on the synthetic COVID
phantoms: folds by patient over training + validation, held-out metrics per setting and baseline, the choice by
CV MSE, fold ensembles on the test section, resume."""

import json
import os

import numpy as np
import pytest

from tests.bundles.conftest import BUNDLES, COVID_TINY, tiny_datalist


@pytest.mark.slow
def test_severity_cv_chooses_on_dev_and_reports_fold_ensembles(tmp_path):
    from cutremain_monai.experiments.severity_cv import severity_cv
    from cutremain_monai.io.datalist import load_datalist

    dl = tiny_datalist(tmp_path, "covid", n=(10, 3, 3))
    settings = {"today": {}, "augment": {"augment_prob": 0.8}}
    tiny = {**COVID_TINY, "epochs": 2, "ensemble_last": 2}
    out = tmp_path / "cv"
    result = severity_cv(os.path.join(BUNDLES, "covid_severity"), dl, str(out), settings, folds=2, **tiny)
    assert result["dev_images"] == 13 and set(result["cv"]) == {"today", "augment", "baseline: constant",
                                                               "baseline: zone_intensity"}
    # the choice is the lowest mean CV MSE among the settings (never a baseline, never the test section)
    means = {n: result["cv"][n]["mse"][0] for n in settings}
    assert result["chosen"] == min(means, key=means.get)
    # each fold's held-out metrics are on the held-out images only, and the folds cover the dev data once
    held = []
    for k in range(2):
        fold = json.load(open(out / f"fold{k}_datalist.json"))
        held += [it["image"] for it in fold["test"]]
        assert json.load(open(out / "today" / f"fold{k}" / "cv_metrics.json"))["n"] == len(fold["test"])
    dev = load_datalist(dl, "training") + load_datalist(dl, "validation")
    assert sorted(held) == sorted(it["image"] for it in dev)
    # the fold ensemble is the mean of the fold models' zone probabilities on the 3 test images
    from cutremain_monai.experiments.severity_cv import _predictions
    from cutremain_monai.metrics.severity import severity_metrics

    preds = [_predictions(str(out / "today" / f"fold{k}" / "test_section_severity.csv")) for k in range(2)]
    test = load_datalist(dl, "test")
    names = [str(it.get("image_id") or it["image"]) for it in test]
    p = np.stack([np.mean([pr[n] for pr in preds], axis=0) for n in names])
    expected = severity_metrics(np.stack([it["zone_scores"] for it in test]), p)
    got = result["test"]["today (fold ensemble of 2)"]
    assert got["n"] == 3 and got["mse"] == pytest.approx(expected["mse"])
    text = open(out / "severity_cv_test.md").read()
    assert "chosen on CV" in text and "baseline: zone_intensity" in text and "augment (fold ensemble of 2)" in text
    assert "(chosen)" in open(out / "severity_cv.md").read()
    # resumed: nothing is trained again
    stamp = os.path.getmtime(out / "today" / "fold0" / "cv_metrics.json")
    again = severity_cv(os.path.join(BUNDLES, "covid_severity"), dl, str(out), settings, folds=2, **tiny)
    assert os.path.getmtime(out / "today" / "fold0" / "cv_metrics.json") == stamp and again["chosen"] == result["chosen"]
