"""COVID severity pieces: metrics vs scikit-learn / SciPy, loss vs torch, batch preparation, checkpoint ensemble."""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.metrics import r2_score, roc_auc_score

from cutremain_monai.engines.severity import SeverityPrepareBatch, ZoneBCELoss
from cutremain_monai.metrics.severity import rater_agreement, severity_metrics, severity_table
from cutremain_monai.networks import CheckpointEnsemble

Y = np.array([[1, 0, 0, 1, 0, 0], [1, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 1, 1]])
P = np.array([[0.8, 0.1, 0.2, 0.7, 0.3, 0.1], [0.6, 0.7, 0.1, 0.9, 0.4, 0.2], [0.1, 0.2, 0.1, 0.2, 0.1, 0.1],
              [0.9, 0.8, 0.7, 0.8, 0.9, 0.6], [0.2, 0.6, 0.3, 0.1, 0.7, 0.8]])


def test_severity_metrics_against_references():
    m = severity_metrics(Y * 2, P)  # raw Brixia scores (0-3) are binarised first
    gy, gp = Y.sum(1), P.sum(1)
    assert m["mse"] == pytest.approx(np.mean((gy - gp) ** 2))
    assert m["mae"] == pytest.approx(np.mean(np.abs(gy - gp)))
    assert m["pearson"] == pytest.approx(pearsonr(gy, gp)[0])
    assert m["r2"] == pytest.approx(r2_score(gy, gp))
    aucs = [roc_auc_score(Y[:, k], P[:, k]) for k in range(6)]
    assert m["zone_auc"]["A"] == pytest.approx(aucs[0]) and m["mean_zone_auc"] == pytest.approx(np.mean(aucs))
    # a zone without positives has no AUC and is left out of the mean
    y2 = Y.copy()
    y2[:, 2] = 0
    m2 = severity_metrics(y2, P)
    assert np.isnan(m2["zone_auc"]["C"]) and m2["mean_zone_auc"] == pytest.approx(np.mean([a for k, a in enumerate(aucs) if k != 2]))


def test_rater_agreement_and_table():
    items = [{"zone_scores": list(y), "zone_scores_other": list(o)} for y, o in zip(Y, (P > 0.5).astype(int))]
    items.append({"zone_scores": [0] * 6})  # no second rater: not counted
    r = rater_agreement(items)
    assert r["n"] == 5 and r["mae"] == pytest.approx(np.mean(np.abs(Y.sum(1) - (P > 0.5).sum(1))))
    table = severity_table(severity_metrics(Y, P), r)
    assert "| model | 5 |" in table and "| rater J vs rater S | 5 |" in table
    assert rater_agreement([{"zone_scores": [1] * 6}]) is None


def test_zone_bce_matches_torch_and_unwraps_tuples():
    p = torch.tensor(P, dtype=torch.float32)
    y = torch.tensor(Y, dtype=torch.float32)
    ref = torch.nn.functional.binary_cross_entropy(p, y)
    loss = ZoneBCELoss()
    assert float(loss(p, y)) == pytest.approx(float(ref), rel=1e-6)
    assert float(loss((p, torch.zeros(5, 1, 4, 4)), y)) == pytest.approx(float(ref), rel=1e-6)
    assert torch.isfinite(loss(torch.tensor([[0.0, 1.0, 0, 0, 0, 0]]), torch.tensor([[1.0, 0, 0, 0, 0, 0]])))  # clamped


def test_prepare_batch_binarises_and_stacks():
    batch = {"image": torch.rand(2, 1, 8, 8), "lung_mask": torch.ones(2, 1, 8, 8), "zones": torch.full((2, 1, 8, 8), 2.9999),
             "zone_scores": [torch.tensor([3, 0]), torch.tensor([0, 1]), torch.tensor([2, 0]), torch.tensor([0, 0]),
                             torch.tensor([1, 0]), torch.tensor([0, 2])]}  # default collate of two 6-lists
    image, label, (mask, zones), kw = SeverityPrepareBatch()(batch)
    assert label.tolist() == [[1, 0, 1, 0, 1, 0], [0, 1, 0, 0, 0, 1]] and kw == {}
    assert zones.dtype == torch.uint8 and (zones == 3).all()  # rounded, and uint8 (what LungZonesd makes)


def test_checkpoint_ensemble_averages(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    paths = []
    for i in range(3):
        m = torch.nn.Linear(3, 2)
        torch.save({"model": m.state_dict()}, tmp_path / f"c{i}.pt")
        paths.append((str(tmp_path / f"c{i}.pt"), m))
    ens = CheckpointEnsemble(net, [p for p, _ in paths])
    x = torch.rand(4, 3)
    expected = torch.stack([m(x) for _, m in paths]).mean(0)
    torch.testing.assert_close(ens(x), expected)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        CheckpointEnsemble(net, [])
    torch.save({"model": torch.nn.Linear(4, 2).state_dict()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: does not match"):
        CheckpointEnsemble(net, [str(tmp_path / "bad.pt")])
