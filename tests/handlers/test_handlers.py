import json
import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

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


def _best_model_epoch(ckpt_dir, score, weight, state=None, filename="model.pt"):
    """One validation epoch scoring ``score`` with a one-weight network set to ``weight`` and MONAI's key-metric
    saver of ``filename``, given the record ``state`` first (a resumed run). Returns the weight in the file and the
    record after the epoch."""
    from monai.handlers import CheckpointSaver

    from cutremain_monai.handlers import BestModelState

    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(net.weight, weight)
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_auc=score))
    saver = CheckpointSaver(str(ckpt_dir), {"model": net}, save_key_metric=True, key_metric_name="val_auc",
                            key_metric_filename=filename)
    saver.attach(engine)
    record = BestModelState(saver)
    if state is not None:
        record.load_state_dict(state)
    engine.run([0], max_epochs=1)
    return torch.load(os.path.join(ckpt_dir, filename), weights_only=True)["weight"].item(), record.state_dict()


def test_best_model_state_carries_the_savers_record_across_a_restart(tmp_path):
    kept, state = _best_model_epoch(tmp_path, 0.9, 1.0)
    assert kept == 1.0 and state["savers"][0]["file"] == "model.pt" and state["savers"][0]["_saved"][0][0] == pytest.approx(0.9)
    torch.save(state, tmp_path / "state.pt")  # what the epoch checkpoint holds loads without pickled objects
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    # resumed: a worse epoch keeps the earlier model, a better one replaces it
    assert _best_model_epoch(tmp_path, 0.5, 2.0, state)[0] == 1.0
    kept, after = _best_model_epoch(tmp_path, 0.95, 3.0, state)
    assert kept == 3.0 and after["savers"][0]["_saved"][0][0] == pytest.approx(0.95)
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "state.pt"]
    # without the record (what every resumed run did before): the first epoch after the restart replaces it
    assert _best_model_epoch(tmp_path, 0.5, 4.0)[0] == 4.0


def test_best_model_state_starts_again_when_the_record_does_not_fit(tmp_path, caplog):
    _, state = _best_model_epoch(tmp_path, 0.9, 1.0)
    # the record is for model.pt, this run keeps model_val_loss.pt (another best_model_metric): chosen again
    with caplog.at_level("WARNING"):
        kept, _ = _best_model_epoch(tmp_path, 0.5, 2.0, state, filename="model_val_loss.pt")
    assert kept == 2.0 and "best-model record is for ['model.pt'], this run keeps ['model_val_loss.pt']" in caplog.text
    # the recorded file is gone (deleted, or a kill between removing the old best and writing the new): dropped
    os.remove(tmp_path / "model.pt")
    caplog.clear()
    with caplog.at_level("WARNING"):
        kept, _ = _best_model_epoch(tmp_path, 0.5, 3.0, state)
    assert kept == 3.0 and "model.pt recorded as the best model is not in" in caplog.text
