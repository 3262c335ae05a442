import json
import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from cutremain_monai.handlers import ClassificationReport, EpochSeed, StopAfterEpochs, default_tracking_uri, latest_checkpoint


def test_default_tracking_uri(tmp_path, monkeypatch):
    import subprocess
    import sys

    from cutremain_monai.handlers import mlflow_registry

    monkeypatch.setattr(mlflow_registry, "_USER_TRACKING_URI", None)
    assert default_tracking_uri(str(tmp_path)) == "sqlite:///" + str(tmp_path / "mlruns.db")
    # the user's MLFLOW_TRACKING_URI (read when the package is imported) wins, e.g. a tracking server
    code = "from cutremain_monai.handlers import default_tracking_uri as d; print(d('/x'))"
    env = dict(os.environ, MLFLOW_TRACKING_URI="http://mlflow.hospital.local:5000")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip()
    assert out == "http://mlflow.hospital.local:5000"
    # ...but what mlflow itself writes into os.environ during a run does not redirect later runs
    import mlflow

    mlflow.set_tracking_uri("sqlite:///" + str(tmp_path / "other.db"))
    assert default_tracking_uri(str(tmp_path)) == "sqlite:///" + str(tmp_path / "mlruns.db")


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    for e in (2, 10, 9):
        (tmp_path / f"checkpoint_epoch={e}.pt").write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_epoch=10.pt")


def _evaluate(handler, preds, labels, batch=3):
    data = [(preds[i:i + batch], labels[i:i + batch]) for i in range(0, len(preds), batch)]
    engine = Engine(lambda e, b: [{"pred": torch.tensor([p]), "label": torch.tensor([y])} for p, y in zip(*b)])
    handler.attach(engine)
    engine.run(data, max_epochs=1)
    return engine


def test_classification_report_threshold_protocol(tmp_path):
    from sklearn.metrics import roc_auc_score

    y = [0, 0, 1, 1, 0, 1, 0, 1]
    p = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.6, 0.55]
    val = _evaluate(ClassificationReport(str(tmp_path), prefix="val"), p, y)
    assert val.state.metrics["val_auc"] == pytest.approx(roc_auc_score(y, p))
    saved = json.load(open(tmp_path / "threshold.json"))
    assert saved["threshold"] == val.state.metrics["val_threshold"]
    assert (tmp_path / "val_roc.png").exists()
    test = _evaluate(ClassificationReport(str(tmp_path), prefix="test", threshold_file=str(tmp_path / "threshold.json")),
                     [0.9, 0.5, 0.3], [1, 1, 0])
    assert test.state.metrics["test_threshold"] == saved["threshold"]  # applied, not re-chosen
    pred = (np.array([0.9, 0.5, 0.3]) >= saved["threshold"]).astype(int)
    assert test.state.metrics["test_accuracy"] == pytest.approx(float((pred == np.array([1, 1, 0])).mean()))
    with pytest.raises(FileNotFoundError, match="train .*first"):
        _evaluate(ClassificationReport(str(tmp_path / "x"), prefix="test", threshold_file=str(tmp_path / "nope.json")), [0.5], [1])


def test_epoch_seed_and_stop():
    from monai.transforms import RandGaussianNoise

    noise = RandGaussianNoise(prob=1.0)
    draws = {}

    def step(engine, batch):
        draws.setdefault(engine.state.epoch, []).append((float(torch.rand(1)), float(noise(torch.zeros(1)).item())))

    for run in range(2):
        engine = Engine(step)
        EpochSeed(seed=5, transforms=[noise]).attach(engine)
        StopAfterEpochs(2).attach(engine)
        engine.run([0, 1], max_epochs=5)
        assert engine.state.epoch == 2
        if run == 0:
            first = dict(draws)
            draws.clear()
    assert draws == first and draws[1] != draws[2]  # same per epoch across runs, different between epochs
