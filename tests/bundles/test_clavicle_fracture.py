import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.bundles.conftest import BUNDLES, config_arg, run_bundle, tiny_datalist
from tests.conftest import ROOT, mlflow_db, free_port

CPU = ["train.yaml", "cpu.yaml"]


@pytest.mark.slow
def test_train_register_evaluate_infer(tmp_path, clavicle_data):
    wf, _ = run_bundle("clavicle_fracture", CPU, tmp_path, datalist=clavicle_data, augmentation="cut_remain",
                       num_copies=1, register_model=True, experiment_name="clav_test")
    out = tmp_path / "out"
    assert (out / "checkpoints" / "model.pt").exists() and (out / "threshold.json").exists()
    metrics = json.load(open(out / "val_metrics.json"))
    assert set(metrics) >= {"auc", "f1", "accuracy", "threshold"} and metrics["n"] == 8  # 4 images -> 8 halves
    assert json.load(open(out / "cam_report.json"))["images"] >= 1
    assert list((out / "cam_overlays").glob("*.png"))
    # MLflow: the run, its params and metrics, and the registered model version
    import mlflow

    mlflow.set_tracking_uri(mlflow_db(tmp_path, "mlruns.db"))
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name("clav_test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["augmentation"] == "cut_remain" and len(run.data.params["datalist_hash"]) == 16
    assert "final_val_auc" in run.data.metrics and "final_cam_report_images" in run.data.metrics
    assert run.data.metrics["set_aside_training"] == 0 and run.data.metrics["set_aside_validation"] == 0
    versions = client.search_model_versions("name='clavicle_fracture'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
    model = mlflow.pytorch.load_model(f"models:/clavicle_fracture/{versions[0].version}")
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 1)
    text = json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert "SYN-" not in text and "SYNTHETIC" not in text  # no patient identifiers

    wf, _ = run_bundle("clavicle_fracture", CPU + ["evaluate.yaml"], tmp_path, datalist=clavicle_data)
    test = json.load(open(out / "test_metrics.json"))
    assert test["threshold"] == json.load(open(out / "threshold.json"))["threshold"]  # chosen on validation
    assert test["n"] == 8

    wf, _ = run_bundle("clavicle_fracture", CPU + ["inference.yaml"], tmp_path, datalist=clavicle_data,
                       input_dir=os.path.join(ROOT, "dicom_samples", "clavicle"))
    rows = list(csv.DictReader(open(out / "inference" / "predictions.csv")))
    assert len(rows) == 120 and all(0 <= float(r["probability"]) <= 1 for r in rows)
    assert all(float(r["probability"]) == pytest.approx(max(float(r["left"]), float(r["right"])), abs=1e-6) for r in rows)
    assert len(list((out / "inference" / "cam").glob("*.png"))) == 240
    # the folder's presentation states are recognised by SOP class and listed, not scored
    skipped = list(csv.DictReader(open(out / "inference" / "skipped.csv")))
    assert len(skipped) == 120 and all("presentation state" in r["reason"] for r in skipped)
    # inference and evaluation share one pipeline: the same probabilities for the test images
    evaluated = {os.path.basename(r["file"]): r for r in csv.DictReader(open(out / "test_predictions.csv"))}
    inferred = {os.path.basename(r["file"]): r for r in rows}
    assert len(evaluated) == 4
    for name, r in evaluated.items():
        for col in ("probability", "left", "right", "prediction"):
            assert float(inferred[name][col]) == pytest.approx(float(r[col]), abs=1e-5), (name, col)


@pytest.mark.slow
@pytest.mark.parametrize("augmentation", ["none", "sup_cutout", "sup_mixup", "sup_cutmix", "hide_and_seek"])
def test_each_augmentation_runs(tmp_path, clavicle_data, augmentation):
    wf, _ = run_bundle("clavicle_fracture", CPU, tmp_path, datalist=clavicle_data, augmentation=augmentation,
                       register_model=False, cam_images=0)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1 and np.isfinite(float(trainer.state.output[0]["loss"]))
    assert (tmp_path / "out" / "checkpoints" / "model.pt").exists()


@pytest.mark.slow
def test_resume_matches_uninterrupted(tmp_path):
    data = tiny_datalist(tmp_path)
    common = dict(datalist=data, epochs=2, register_model=False, cam_images=0, augmentation="cut_remain", num_copies=2)
    a, _ = run_bundle("clavicle_fracture", CPU, tmp_path / "a", **common)
    run_bundle("clavicle_fracture", CPU, tmp_path / "b", stop_after_epochs=1, **common)  # "killed" after epoch 1
    assert json.load(open(tmp_path / "b" / "out" / "val_metrics.json"))
    b, _ = run_bundle("clavicle_fracture", CPU, tmp_path / "b", **common)  # restarts from the epoch-1 checkpoint
    ta, tb = a.parser.get_parsed_content("train#trainer"), b.parser.get_parsed_content("train#trainer")
    assert tb.state.epoch == 2 and tb.state.iteration == ta.state.iteration
    ma = json.load(open(tmp_path / "a" / "out" / "val_metrics.json"))
    mb = json.load(open(tmp_path / "b" / "out" / "val_metrics.json"))
    assert ma == mb
    wa = a.parser.get_parsed_content("network").state_dict()
    wb = b.parser.get_parsed_content("network").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k])
    # the best model and its threshold are the uninterrupted run's too (the savers' scores travel in the checkpoint)
    for name in ("model.pt", "model_val_loss.pt"):
        ba, bb = (torch.load(tmp_path / r / "out" / "checkpoints" / name, weights_only=True) for r in ("a", "b"))
        for k in ba:
            torch.testing.assert_close(ba[k], bb[k])
    assert json.load(open(tmp_path / "a" / "out" / "threshold.json")) == json.load(open(tmp_path / "b" / "out" / "threshold.json"))


@pytest.mark.slow
def test_a_resumed_run_keeps_an_earlier_better_model(tmp_path):
    """Epoch 1 scored better than anything after it: after a restart at epoch 2, model.pt and threshold.json stay
    epoch 1's (before, the savers restarted empty and the first epoch after a restart always replaced them)."""
    data = tiny_datalist(tmp_path)
    common = dict(datalist=data, epochs=2, register_model=False, cam_images=0)
    run_bundle("clavicle_fracture", CPU, tmp_path, stop_after_epochs=1, **common)
    ckpts = tmp_path / "out" / "checkpoints"
    state = torch.load(ckpts / "checkpoint_epoch=1.pt", weights_only=True)
    assert [len(s["_saved"]) for s in state["best_models"]["savers"]] == [1, 1]  # model.pt, model_val_loss.pt
    for s in state["best_models"]["savers"]:  # no later epoch beats these scores
        s["_saved"] = [[1e9, f] for _, f in s["_saved"]]
    torch.save(state, ckpts / "checkpoint_epoch=1.pt")
    before = torch.load(ckpts / "model.pt", weights_only=True)
    threshold = json.load(open(tmp_path / "out" / "threshold.json"))
    wf, _ = run_bundle("clavicle_fracture", CPU, tmp_path, **common)
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == 2
    after = torch.load(ckpts / "model.pt", weights_only=True)
    for k in before:
        torch.testing.assert_close(before[k], after[k])
    assert json.load(open(tmp_path / "out" / "threshold.json")) == threshold
    trained = wf.parser.get_parsed_content("network").state_dict()  # while the network itself trained on
    assert any(not torch.equal(trained[k].cpu(), before[k]) for k in before if before[k].is_floating_point())


@pytest.mark.slow
def test_a_checkpoint_from_before_the_best_model_record_still_resumes(tmp_path, capfd):
    data = tiny_datalist(tmp_path)
    common = dict(datalist=data, epochs=2, register_model=False, cam_images=0)
    run_bundle("clavicle_fracture", CPU, tmp_path, stop_after_epochs=1, **common)
    path = tmp_path / "out" / "checkpoints" / "checkpoint_epoch=1.pt"
    state = torch.load(path, weights_only=True)
    del state["best_models"]
    torch.save(state, path)
    capfd.readouterr()
    wf, _ = run_bundle("clavicle_fracture", CPU, tmp_path, **common)  # the bundle's logging.conf: to stderr
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == 2 * state["trainer"]["iteration"]
    out = capfd.readouterr()
    assert "has no best_models (written before they were saved)" in out.err + out.out


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    data = tiny_datalist(tmp_path)
    out = tmp_path / "ddp"
    cfg = config_arg(["train.yaml", "cpu.yaml", "multi_gpu_train.yaml"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "monai.bundle", "run",
           "--config_file", cfg, "--bundle_root", os.path.join(BUNDLES, "clavicle_fracture"), "--output_dir", str(out),
           "--datalist", data, "--image_size", "[64,64]", "--network_depth", "10", "--epochs", "1",
           "--batch_size", "4", "--cam_images", "0", "--register_model", "False",
           "--tracking_uri", mlflow_db(tmp_path, "ddp.db")]
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=os.path.join(BUNDLES, "clavicle_fracture"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoints" / "model.pt").exists()
    assert len(list((out / "checkpoints").glob("checkpoint_epoch=*.pt"))) == 1  # written once, by rank 0
    m = json.load(open(out / "val_metrics.json"))
    assert m["n"] == 8  # all 4 validation images (8 halves) gathered from both ranks
    # both ranks trained from one preprocessed cache beside the datalist: one record per image, built once
    records = list((tmp_path / ".preprocessed").rglob("*.rec"))
    assert len(records) == 6 + 4 and not list((tmp_path / ".preprocessed").rglob("*.tmp"))


@pytest.mark.slow
def test_tracking_mlflow_flag_logs_epochs_and_registers_once(tmp_path):
    """`monai.bundle run --tracking mlflow`: MONAI's handler logs per-epoch values and the resolved config, ours
    adds params/artifacts and registers the model in the same run."""
    data = tiny_datalist(tmp_path)
    db = mlflow_db(tmp_path, "track.db")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg(CPU),
           "--bundle_root", os.path.join(BUNDLES, "clavicle_fracture"), "--output_dir", str(tmp_path / "out"),
           "--datalist", data, "--image_size", "[64,64]", "--network_depth", "10", "--epochs", "2", "--batch_size", "8",
           "--cam_images", "2", "--tracking", "mlflow", "--tracking_uri", db, "--experiment_name", "tracked"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # a fresh shell, not this test process
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.join(BUNDLES, "clavicle_fracture"), timeout=600, env=dict(clean, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=db, registry_uri=db)
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # our registry handler reused MONAI's run
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "val_auc")
    assert [m.step for m in history] == [1, 2], proc.stdout[-4000:] + proc.stderr[-4000:]  # per epoch
    assert "final_val_auc" in run.data.metrics
    assert run.data.params["augmentation"] == "cut_remain"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"val_roc.png", "cam_overlays", "threshold.json"} <= names or {"cam_overlays", "threshold.json"} <= names
    assert any(n.startswith("config_") for n in names)  # the resolved config, saved by MONAI
    assert client.search_model_versions("name='clavicle_fracture'")[0].run_id == run.info.run_id


@pytest.mark.slow
@pytest.mark.parametrize("augmentation,guidance", [("none", "gain"), ("none", "isnet"), ("cut_remain", "isnet"), ("sup_mixup", "gain")])
def test_each_guidance_runs_and_logs(tmp_path, capfd, augmentation, guidance):
    """Epoch 1 plain (ISNet calibrates its band), epoch 2 guided; loss terms per epoch in the metrics and per
    iteration in MLflow; the validation overlays show the guided method's own maps; BatchNorm statistics
    recomputed before each validation."""
    data = tiny_datalist(tmp_path)
    wf, _ = run_bundle("clavicle_fracture", CPU, tmp_path, datalist=data, augmentation=augmentation, guidance=guidance,
                       num_copies=1, epochs=2, guidance_warmup_epochs=1, register_model=True, experiment_name="guided")
    trainer = wf.parser.get_parsed_content("train#trainer")
    terms = ["loss_cl", "loss_heatmap"] if guidance == "isnet" else ["loss_cl", "loss_am", "loss_e"]
    assert all(np.isfinite(trainer.state.metrics[f"guidance_{t}"]) for t in terms)
    logged = "".join(capfd.readouterr())
    assert logged.count("BatchNorm statistics recomputed from") == 2  # precise_bn_batches: on for guided runs
    # ...before validation: the trainer's EPOCH_COMPLETED handlers run in order, PreciseBatchNorm before validation
    from ignite.engine import Events
    from monai.handlers import ValidationHandler

    from cutremain_monai.handlers import PreciseBatchNorm

    kinds = [type(getattr(h, "__self__", h)) for h, _, _ in trainer._event_handlers[Events.EPOCH_COMPLETED]]
    assert kinds.index(PreciseBatchNorm) < kinds.index(ValidationHandler)
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.best_metric_epoch == 2  # model.pt is a guided epoch's
    out = tmp_path / "out"
    # guided runs keep the lowest validation loss (L_cl + the guidance term on the validation masks) as model.pt
    # and the best validation AUC beside it
    guided_term = "val_loss_heatmap" if guidance == "isnet" else "val_loss_e"
    assert np.isfinite(evaluator.state.metrics["val_loss"]) and np.isfinite(evaluator.state.metrics[guided_term])
    assert (out / "checkpoints" / "model.pt").exists() and (out / "checkpoints" / "model_val_auc.pt").exists()
    # ...and the best validation AUC with the background swapped (on for guided runs), computed before the savers
    assert 0.0 <= evaluator.state.metrics["val_auc_swap"] <= 1.0 and (out / "checkpoints" / "model_val_auc_swap.pt").exists()
    swap = wf.parser.get_parsed_content("validate#swap_checkpoint_saver")._key_metric_checkpoint._saved
    assert swap[-1].priority == pytest.approx(evaluator.state.metrics["val_auc_swap"])
    saved = wf.parser.get_parsed_content("validate#checkpoint_saver")._key_metric_checkpoint._saved
    assert saved[-1].priority == pytest.approx(-evaluator.state.metrics["val_loss"])  # model.pt: epoch 2's val_loss
    assert json.load(open(out / "threshold.json"))["epoch"] == 2  # the test threshold comes from model.pt's epoch
    report = json.load(open(out / "cam_report.json"))
    assert report["method"] == ("lrp" if guidance == "isnet" else "gradcam") and list((out / "cam_overlays").glob("*.png"))
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_db(tmp_path, "mlruns.db"))
    run = client.search_runs([client.get_experiment_by_name("guided").experiment_id])[0]
    assert run.data.params["guidance"] == guidance and run.data.params["augmentation"] == augmentation
    per_epoch = trainer.state.epoch_length
    guided = list(range(per_epoch + 1, 2 * per_epoch + 1))  # every iteration of the guided epoch
    for t in terms:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, f"train_{t}")]
        # ISNet's calibration epoch runs its own step (LRP maps for the band), so L_cl is logged there too
        assert steps == (list(range(1, per_epoch + 1)) if guidance == "isnet" and t == "loss_cl" else []) + guided
    if guidance == "isnet":
        c1, c2 = wf.parser.get_parsed_content("train#guided_step").band
        assert 0 < c1 <= c2
        saved = torch.load(sorted((out / "checkpoints").glob("checkpoint_epoch=*.pt"))[-1], weights_only=False)
        assert saved["guidance"]["band"] == [c1, c2]  # a resumed run keeps the band


@pytest.mark.slow
def test_the_background_swap_metric_changes_no_training_step(tmp_path):
    """val_auc_swap adds a forward in eval mode per validation batch and a checkpoint: the trained weights are
    the same to the bit with it on and off (so runs with and without it compare)."""
    data = tiny_datalist(tmp_path)
    weights = {}
    for on in (True, False):
        out = tmp_path / f"swap_{on}"
        run_bundle("clavicle_fracture", CPU, out, datalist=data, guidance="isnet", num_copies=1, epochs=2,
                   guidance_warmup_epochs=1, background_swap_auc=on)
        ckpt = sorted((out / "out" / "checkpoints").glob("checkpoint_epoch=*.pt"))[-1]
        weights[on] = torch.load(ckpt, weights_only=False)["model"]
        assert (out / "out" / "checkpoints" / "model_val_auc_swap.pt").exists() == on
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])


@pytest.mark.slow
@pytest.mark.parametrize("guidance", ["isnet", "gain"])
def test_guidance_ddp_two_cpu_processes(tmp_path, guidance):
    """The guided steps' double backward (and GAIN's second forward) under DistributedDataParallel (gloo)."""
    data = tiny_datalist(tmp_path)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "monai.bundle", "run",
           "--config_file", config_arg(["train.yaml", "cpu.yaml", "multi_gpu_train.yaml"]),
           "--bundle_root", os.path.join(BUNDLES, "clavicle_fracture"), "--output_dir", str(out),
           "--datalist", data, "--image_size", "[64,64]", "--network_depth", "10", "--epochs", "2", "--guidance", guidance,
           "--guidance_warmup_epochs", "1", "--batch_size", "4", "--cam_images", "0", "--register_model", "False",
           "--tracking_uri", mlflow_db(tmp_path, "ddp.db")]
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=os.path.join(BUNDLES, "clavicle_fracture"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = torch.load(sorted((out / "checkpoints").glob("checkpoint_epoch=*.pt"))[-1], weights_only=False)
    if guidance == "isnet":
        assert saved["guidance"]["band"][0] > 0  # calibrated from both ranks' maps
    assert re.search(r"Epoch\[2\] Metrics -- .*guidance_loss_cl", proc.stdout + proc.stderr)  # a guided epoch ran
    # precise BatchNorm on both ranks (statistics averaged over them: the ranks' models stay identical)
    assert (proc.stdout + proc.stderr).count("epoch 2: BatchNorm statistics recomputed") == 2
