import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from cutremain_monai.metrics.classification import best_f1_threshold, binary_metrics
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
