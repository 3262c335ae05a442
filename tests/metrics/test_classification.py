import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from cutremain_monai.metrics.classification import auc_ci, best_f1_threshold, binary_metrics
from cutremain_monai.metrics.feature_similarity import feature_distances, pooled_features
from cutremain_monai.networks import resnet

Y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0])
S = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.6, 0.55, 0.3, 0.05])


def test_binary_metrics_against_sklearn_and_hand():
    m = binary_metrics(Y, S, threshold=0.5)
    assert m["auc"] == pytest.approx(roc_auc_score(Y, S))
    pred = (S >= 0.5).astype(int)  # [0,0,0,1,0,1,1,1,0,0]: TP 3, FP 1, FN 2
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2)) == pytest.approx(f1_score(Y, pred))
    assert m["accuracy"] == pytest.approx(7 / 10)
    t = best_f1_threshold(Y, S)
    best = max(f1_score(Y, (S >= c).astype(int)) for c in np.unique(S))
    assert f1_score(Y, (S >= t).astype(int)) == pytest.approx(best)
    assert binary_metrics(Y, S)["threshold"] == t  # chosen on this data when not given


def test_feature_distances():
    torch.manual_seed(0)
    net = resnet(10)
    x = torch.rand(1, 64, 64)
    f = pooled_features(net, x[None])
    assert f.shape == (1, 512)
    same = feature_distances(net, [(x, x)])
    assert same["euclidean"] == pytest.approx(0, abs=1e-5) and same["cosine"] == pytest.approx(0, abs=1e-5)
    y = torch.rand(1, 64, 64)
    d = feature_distances(net, [(x, y), (x, x)])
    fx, fy = pooled_features(net, torch.stack([x, y]))
    assert d["euclidean"] == pytest.approx(float(torch.linalg.vector_norm(fx - fy)) / 2, rel=1e-4)
    assert d["pairs"] == 2
    with pytest.raises(ValueError, match="layer 'nope' not found"):
        pooled_features(net, x[None], "nope")


# multi-label: 6 samples x 3 classes; class 2 has no positives (its AUC is undefined and is left out of the mean)
YL = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
PL = np.array([[0.9, 0.2, 0.1], [0.3, 0.7, 0.2], [0.6, 0.4, 0.3], [0.2, 0.1, 0.6], [0.4, 0.6, 0.1], [0.7, 0.8, 0.2]])


def test_multilabel_metrics_against_sklearn():
    from sklearn.metrics import average_precision_score, precision_score, recall_score

    from cutremain_monai.metrics.classification import multilabel_metrics

    t = [0.5, 0.5, 0.5]
    m = multilabel_metrics(YL, PL, ["a", "b", "c"], thresholds=t)
    pred = (PL >= 0.5).astype(int)
    aucs = [roc_auc_score(YL[:, c], PL[:, c]) for c in (0, 1)]
    assert m["auc"] == pytest.approx(np.mean(aucs)) and np.isnan(m["per_class"]["c"]["auc"])
    assert m["map"] == pytest.approx(np.mean([average_precision_score(YL[:, c], PL[:, c]) for c in (0, 1)]))
    cp = precision_score(YL, pred, average="macro", zero_division=0)
    cr = recall_score(YL, pred, average="macro", zero_division=0)
    assert m["cf1"] == pytest.approx(2 * cp * cr / (cp + cr))
    assert m["of1"] == pytest.approx(f1_score(YL, pred, average="micro"))
    # by hand: class a: pred [1,0,1,0,0,1] vs [1,0,1,0,1,0] -> TP 2 FP 1 FN 1; b: pred [0,1,0,0,1,1] vs [0,1,1,0,0,1]
    # -> TP 2 FP 1 FN 1; c: pred [0,0,0,1,0,0], no positives -> TP 0 FP 1. Micro: TP 4, FP 3, FN 2 -> 8 / 13
    assert m["of1"] == pytest.approx(8 / 13)
    assert m["per_class"]["a"]["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(2 / 6)
    chosen = multilabel_metrics(YL, PL, ["a", "b", "c"])  # thresholds chosen per class by best F1
    assert chosen["thresholds"][0] == best_f1_threshold(YL[:, 0], PL[:, 0]) and chosen["thresholds"][2] == 0.5
    with pytest.raises(ValueError, match="2 thresholds for 3 classes"):
        multilabel_metrics(YL, PL, thresholds=[0.5, 0.5])


def test_multiclass_metrics_against_sklearn():
    from cutremain_monai.metrics.classification import multiclass_metrics

    y = np.array([0, 1, 2, 0, 1, 2, 0, 0])
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3],
                  [0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1], [0.4, 0.1, 0.5]])
    m = multiclass_metrics(y, p, ["normal", "A", "B"])
    for c, n in enumerate(["normal", "A", "B"]):
        assert m["per_class"][n]["auc"] == pytest.approx(roc_auc_score(y == c, p[:, c]))
    f1s = f1_score(y, p.argmax(1), average=None)
    assert [m["per_class"][n]["f1"] for n in ("normal", "A", "B")] == pytest.approx(list(f1s))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["accuracy"] == pytest.approx(5 / 8)  # wrong: sample 3 (-> A), 4 (-> normal), 7 (-> B)
    onehot = np.eye(3)[y]
    assert multiclass_metrics(onehot, p)["auc"] == pytest.approx(m["auc"])


def test_mean_auc_handler_metric_skips_undefined_classes():
    from cutremain_monai.handlers.mean_auc import MeanAUCMetric

    metric = MeanAUCMetric()
    metric(torch.as_tensor(PL), torch.as_tensor(YL))
    expected = np.mean([roc_auc_score(YL[:, c], PL[:, c]) for c in (0, 1)])
    assert metric.aggregate() == pytest.approx(expected)  # MONAI's ROCAUCMetric gives NaN here (class c)
    metric.reset()
    metric(torch.as_tensor(PL[:, :1]), torch.zeros(6, 1))
    with pytest.warns(UserWarning, match="mean AUC undefined"):
        assert metric.aggregate() == 0.0


def test_auc_ci_bootstrap():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40), np.ones(40)]
    p = y + rng.normal(0, 0.8, 80)
    auc, low, high = auc_ci(y, p, n_boot=500)
    assert auc == pytest.approx(roc_auc_score(y, p)) and low < auc < high
    # the percentile interval of the resampled AUCs, by hand with the same draws
    r = np.random.default_rng(0)
    values = []
    while len(values) < 500:
        idx = r.integers(0, 80, 80)
        if y[idx].min() != y[idx].max():
            values.append(roc_auc_score(y[idx], p[idx]))
    assert (low, high) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])))
    wide = auc_ci(y[::4], p[::4], n_boot=500)
    assert wide[2] - wide[1] > high - low  # fewer images, wider interval
    assert auc_ci(y, y, n_boot=200) == (1.0, 1.0, 1.0)
    assert all(np.isnan(v) for v in auc_ci(np.ones(5), np.arange(5)))
