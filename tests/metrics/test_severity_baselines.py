"""The severity baselines: zone features by hand, the constant = the training mean, a zone-intensity model that
finds a signal that is there, and the verdict line of the table."""

import numpy as np
import pytest

from cutremain_monai.metrics.severity_baselines import (
    fit_baselines,
    predict_baselines,
    severity_baselines,
    zone_intensity_features,
)
from cutremain_monai.metrics.severity import beats_baselines, severity_metrics, severity_table


def test_zone_features_by_hand():
    img = np.arange(16, dtype=float).reshape(4, 4)
    zones = np.array([[1, 1, 4, 4], [2, 2, 5, 5], [3, 3, 6, 0], [3, 3, 6, 6]])
    lung = zones > 0
    f = zone_intensity_features(img[None], lung[None], zones[None])
    assert f.shape == (6, 6)
    v = np.array([8.0, 9, 12, 13])  # zone 3 (C)
    np.testing.assert_allclose(f[2], [v.mean(), v.std(), *np.percentile(v, [10, 50, 90]), 4 / 15])
    np.testing.assert_allclose(f[5, 0], np.mean([10, 14, 15]))
    empty = zone_intensity_features(img, lung, np.where(zones == 6, 0, zones))
    assert (empty[5] == 0).all()


def _synthetic(n, rng):
    """Zone k is affected when its mean intensity is high (plus noise), as opacities are."""
    feats = rng.normal(size=(n, 6, 6))
    scores = np.where(feats[:, :, 0] + 0.3 * rng.normal(size=(n, 6)) > 0.3, rng.integers(1, 4, size=(n, 6)), 0)
    return feats, scores


def test_constant_is_the_training_mean_and_zone_intensity_finds_the_signal():
    rng = np.random.default_rng(0)
    f_tr, s_tr = _synthetic(200, rng)
    f_te, s_te = _synthetic(100, rng)
    fitted = fit_baselines(f_tr, s_tr)
    p = predict_baselines(fitted, f_te)
    np.testing.assert_allclose(p["constant"], np.repeat((s_tr > 0).mean(0)[None], 100, axis=0))
    const, zi = severity_metrics(s_te, p["constant"]), severity_metrics(s_te, p["zone_intensity"])
    assert np.isnan(const["pearson"])  # the same global score for everyone
    assert zi["mean_zone_auc"] > 0.9 and zi["mse"] < const["mse"] / 2
    # a zone with one class in training falls back to the constant
    s1 = s_tr.copy()
    s1[:, 2] = 0
    p1 = predict_baselines(fit_baselines(f_tr, s1), f_te)
    assert (p1["zone_intensity"][:, 2] == 0).all()
    with pytest.raises(ValueError, match="differ"):
        fit_baselines(f_tr[:10], s_tr[:9])


def test_severity_baselines_through_a_transform_and_the_verdict():
    rng = np.random.default_rng(1)
    zones = np.zeros((1, 24, 24), dtype=int)
    for k in range(6):
        r, c = divmod(k, 2)
        zones[0, r * 8:(r + 1) * 8, c * 12:(c + 1) * 12] = [1, 4, 2, 5, 3, 6][k]

    def item(i):
        s = rng.integers(0, 4, size=6) * (rng.random(6) < 0.5)
        img = rng.normal(size=(1, 24, 24)) * 0.1
        for k in range(6):
            img[zones == k + 1] += 1.0 * (s[k] > 0)
        return {"image": img, "zone_scores": s.tolist(), "image_id": f"im{i}", "zones": zones}

    train, test = [item(i) for i in range(60)], [item(i) for i in range(60, 90)]
    test.append({"image": "missing.png", "zone_scores": [0] * 6})

    def transform(d):
        if isinstance(d["image"], str):
            raise FileNotFoundError(d["image"])
        return {"image": d["image"], "lung_mask": np.ones((1, 24, 24)), "zones": d["zones"]}

    out = severity_baselines(train, test, transform)
    assert out["n_train"] == 60 and out["zone_intensity"]["n"] == 30  # the unreadable one set aside
    assert out["zone_intensity"]["mean_zone_auc"] > 0.95
    model = {**out["constant"], "mse": out["constant"]["mse"] - 0.1, "pearson": 0.2}
    v = beats_baselines(model, {k: out[k] for k in ("constant", "zone_intensity")})
    assert v["per_baseline"]["constant"] == {"mse": True, "pearson": True} and not v["all"]
    table = severity_table(model, None, baselines={k: out[k] for k in ("constant", "zone_intensity")})
    assert "| baseline: zone_intensity | 30 |" in table and "does NOT beat every baseline" in table
