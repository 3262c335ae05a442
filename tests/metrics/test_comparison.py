"""DeLong's AUC variance and paired test against the definition computed by hand (a double loop over positive x
negative pairs), the bootstrap, the threshold rules and calibration against scikit-learn."""

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from cutremain_monai.metrics.classification import choose_threshold
from cutremain_monai.metrics.comparison import (
    bootstrap_mean_ci,
    calibration,
    delong_ci,
    delong_covariance,
    delong_paired,
    operating_point,
)


def _delong_by_hand(y, scores):
    """DeLong (1988) from its definition: psi over every (positive, negative) pair, no ranks."""
    y = np.asarray(y)
    out_auc, v10s, v01s = [], [], []
    for s in scores:
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]).astype(float) + 0.5 * (x[:, None] == z[None, :])
        out_auc.append(psi.mean())
        v10s.append(psi.mean(1))
        v01s.append(psi.mean(0))
    m, n = len(v10s[0]), len(v01s[0])
    k = len(scores)
    cov = np.zeros((k, k))
    for a in range(k):
        for b in range(k):
            s10 = np.sum((v10s[a] - v10s[a].mean()) * (v10s[b] - v10s[b].mean())) / (m - 1)
            s01 = np.sum((v01s[a] - v01s[a].mean()) * (v01s[b] - v01s[b].mean())) / (n - 1)
            cov[a, b] = s10 / m + s01 / n
    return np.asarray(out_auc), cov


@pytest.mark.parametrize("ties", [False, True])
def test_delong_matches_the_definition(ties):
    rng = np.random.default_rng(3)
    y = (rng.random(60) < 0.35).astype(int)
    a = rng.normal(size=60) + 1.2 * y
    b = 0.6 * a + rng.normal(size=60) * 0.8 + 0.3 * y
    if ties:
        a, b = np.round(a, 0), np.round(b, 0)  # many tied scores: psi = 0.5 on ties, midranks
    auc, cov = delong_covariance(y, np.stack([a, b]))
    ref_auc, ref_cov = _delong_by_hand(y, [a, b])
    np.testing.assert_allclose(auc, ref_auc, atol=1e-12)
    np.testing.assert_allclose(auc, [roc_auc_score(y, a), roc_auc_score(y, b)], atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    d = delong_paired(y, a, b)
    var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
    assert d["difference"] == pytest.approx(ref_auc[0] - ref_auc[1])
    assert d["z"] == pytest.approx(d["difference"] / np.sqrt(var))
    assert d["high"] - d["low"] == pytest.approx(2 * 1.959964 * np.sqrt(var), rel=1e-5)


def test_delong_variance_agrees_with_the_bootstrap():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(int)
    s = rng.normal(size=400) + y
    auc, low, high = delong_ci(y, s)
    boots = []
    for _ in range(1500):
        i = rng.integers(0, 400, 400)
        if y[i].min() != y[i].max():
            boots.append(roc_auc_score(y[i], s[i]))
    assert (high - low) / (2 * 1.96) == pytest.approx(np.std(boots), rel=0.15)
    assert low < auc < high


def test_delong_paired_identical_and_errors():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    d = delong_paired(y, s, s)
    assert d["difference"] == 0 and d["p"] == 1.0
    with pytest.raises(ValueError, match="both classes"):
        delong_ci(np.zeros(4), np.arange(4))
    with pytest.raises(ValueError, match="3 scores for 4 labels"):
        delong_ci([0, 1, 0, 1], [0.1, 0.2, 0.3])


def test_bootstrap_mean_ci():
    v = np.r_[np.ones(30), np.zeros(70), np.nan]
    m, lo, hi = bootstrap_mean_ci(v, n_boot=4000, seed=1)
    assert m == pytest.approx(0.3)
    se = np.sqrt(0.3 * 0.7 / 100)
    assert lo == pytest.approx(0.3 - 1.96 * se, abs=0.02) and hi == pytest.approx(0.3 + 1.96 * se, abs=0.02)
    assert all(np.isnan(bootstrap_mean_ci([np.nan])))


def test_threshold_rules_by_hand():
    y = [0, 0, 0, 0, 1, 1, 1, 0]
    p = [0.1, 0.2, 0.3, 0.55, 0.5, 0.7, 0.9, 0.6]
    # Youden: at 0.5 sensitivity 1, specificity 3/5 (J 0.6); at 0.7 sens 2/3, spec 1 (J 0.667) -> 0.7
    assert choose_threshold(y, p, "youden") == pytest.approx(0.7)
    # sensitivity >= 0.9: only thresholds <= 0.5 keep all three positives; the highest is 0.5
    assert choose_threshold(y, p, "sensitivity", 0.9) == pytest.approx(0.5)
    assert choose_threshold(y, p, "sensitivity", 0.6) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="threshold rule"):
        choose_threshold(y, p, "median")


def test_youden_does_not_move_with_prevalence_but_f1_does():
    """The same two score distributions (positives N(1.5, 1), negatives N(0, 1), evenly spaced quantiles, so no
    sampling noise) at 50% and at 10% positives: Youden's threshold stays near the crossing point 0.75, F1's moves."""
    from scipy.stats import norm as normal

    def sample(n_pos, n_neg):
        q = lambda n: (np.arange(n) + 0.5) / n  # noqa: E731
        return (np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(int),
                np.r_[normal.ppf(q(n_pos), 1.5, 1), normal.ppf(q(n_neg), 0, 1)])
    y1, s1 = sample(400, 400)
    y2, s2 = sample(100, 900)
    t1, t2 = choose_threshold(y1, s1, "youden"), choose_threshold(y2, s2, "youden")
    assert abs(t1 - 0.75) < 0.1 and abs(t2 - 0.75) < 0.1
    assert choose_threshold(y2, s2, "f1") - choose_threshold(y1, s1, "f1") > 0.5


def test_delong_edge_cases():
    auc, low, high = delong_ci([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3])  # one positive: no interval
    assert auc == 1.0 and np.isnan(low) and np.isnan(high)
    y = np.array([0, 0, 1, 1])
    d = delong_paired(y, [0.1, 0.2, 0.8, 0.9], [0.2, 0.1, 0.8, 0.9])  # both AUC 1: nothing to tell apart
    assert d["difference"] == 0 and d["p"] == 1.0


def test_operating_point_and_calibration():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.6, 0.2, 0.1, 0.7, 0.3, 0.05, 0.95])
    op = operating_point(y, p, 0.5)
    assert (op["tp"], op["fn"], op["tn"], op["fp"]) == (3, 1, 3, 1)
    assert op["sensitivity"] == 0.75 and op["specificity"] == 0.75 and op["f1"] == pytest.approx(0.75)
    c = calibration(y, p, bins=5)
    assert c["brier"] == pytest.approx(brier_score_loss(y, p))
    frac, mean = calibration_curve(y, p, n_bins=5, strategy="uniform")
    np.testing.assert_allclose(c["fraction_positive"], frac)
    np.testing.assert_allclose(c["mean_predicted"], mean)
