"""tools/epoch_metrics.py: the epoch metrics of a training log, runs told apart, a resumed epoch kept once."""

import importlib.util
import os

from tests.conftest import ROOT


def _tool():
    spec = importlib.util.spec_from_file_location("epoch_metrics", os.path.join(ROOT, "tools", "epoch_metrics.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _line(epoch, **kv):
    return (f"2026-12-07 21:24:29,850 - INFO - Epoch[{epoch}] Metrics -- "
            + " ".join(f"{k}: {v:.4f}" for k, v in kv.items()) + " ")


def test_runs_epochs_and_table(tmp_path, capsys):
    mod = _tool()
    start = "2026-12-07 21:09:47 - ignite.engine.engine.SupervisedTrainer - INFO - Engine run resuming from iteration "
    restored = ("2026-12-07 21:44:13,415 - ignite.engine.engine.SupervisedTrainer - INFO - Restored all variables from "
                "/x/checkpoints/checkpoint_epoch=1.pt")
    lines = [start + "0, epoch 0 until 3 epochs", _line(1, val_auc=0.5, val_loss=0.7), _line(1, guidance_loss_cl=0.69),
             "Epoch [2/3]: [1/8]  12%|\r" + _line(2, val_auc=0.6, val_loss=0.65),
             # a resume, as the bundles log it (the checkpoint is loaded after ignite's start line): the same run,
             # its repeated epoch's last line counts
             start + "0, epoch 0 until 3 epochs", restored,
             _line(2, val_auc=0.625, val_loss=0.6), _line(3, val_auc=0.75, val_loss=0.5),
             start + "0, epoch 0 until 2 epochs", _line(1, val_auc=0.9, val_loss=0.3),  # a second run
             _line(2, val_auc=1.0, val_loss=0.1e-3)]
    log = tmp_path / "run.log"
    log.write_text("\n".join(lines) + "\n")
    runs = mod.epoch_metrics(log.read_text().replace("\r", "\n").splitlines())
    assert runs == [{1: {"val_auc": 0.5, "val_loss": 0.7, "guidance_loss_cl": 0.69},
                     2: {"val_auc": 0.625, "val_loss": 0.6}, 3: {"val_auc": 0.75, "val_loss": 0.5}},
                    {1: {"val_auc": 0.9, "val_loss": 0.3}, 2: {"val_auc": 1.0, "val_loss": 0.0001}}]
    assert mod.main([str(log), "--run", "0", "--every", "2", "--keys", "val_auc,guidance_loss_cl"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| epoch | val_auc | guidance_loss_cl |", "|---|---|---|",
        "| 1 | 0.500 | 0.690 |", "| 2 | 0.625 |  |", "| 3 | 0.750 |  |"]
    # a log without the trainer's start lines: a run starts where the epoch falls
    assert mod.epoch_metrics([x for x in lines if "Engine run" not in x and "Restored" not in x]) == [
        {1: {"val_auc": 0.5, "val_loss": 0.7, "guidance_loss_cl": 0.69}, 2: {"val_auc": 0.625, "val_loss": 0.6},
         3: {"val_auc": 0.75, "val_loss": 0.5}}, {1: {"val_auc": 0.9, "val_loss": 0.3}, 2: {"val_auc": 1.0, "val_loss": 0.0001}}]
    empty = tmp_path / "empty.log"
    empty.write_text("nothing\n")
    assert mod.main([str(empty)]) == 1 and "no 'Epoch[N] Metrics --' lines" in capsys.readouterr().err
