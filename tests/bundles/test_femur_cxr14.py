"""Femur (3-class) and ChestX-ray14 (14-label) bundles: one short epoch per config on dicom_samples, metadata,
DDP, and the annotation-budget (gamma) runner."""

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.bundles.conftest import BUNDLES, config_arg, run_bundle, tiny_datalist
from tests.conftest import ROOT, SAMPLES, mlflow_db, free_port

CPU = ["train.yaml", "cpu.yaml"]
CXR14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
         "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def _same_rows(evaluated_csv, inferred_rows, columns, n):
    """Inference and evaluation share one pipeline: the same probabilities and predictions for the test images."""
    evaluated = {os.path.basename(r["file"]): r for r in csv.DictReader(open(evaluated_csv))}
    inferred = {os.path.basename(r["file"]): r for r in inferred_rows}
    assert len(evaluated) == n
    for name, e in evaluated.items():
        for col in [*columns, "probability"]:
            assert float(inferred[name][col]) == pytest.approx(float(e[col]), abs=1e-5), (name, col)
        assert inferred[name]["prediction"] == e["prediction"]


@pytest.mark.slow
@pytest.mark.parametrize("augmentation", ["cut_remain", "sup_cutmix"])
def test_femur_train_evaluate_infer(tmp_path, augmentation):
    data = tiny_datalist(tmp_path, "pelvis", n=(6, 3, 3))
    run_bundle("femur_fracture", CPU, tmp_path, datalist=data, augmentation=augmentation, num_copies=1,
               register_model=True, experiment_name="femur_test")
    out = tmp_path / "out"
    val = json.load(open(out / "val_metrics.json"))
    assert val["n"] == 6 and set(val["per_class"]) == {"normal", "trochanteric", "neck"}  # 3 images -> 6 halves
    assert sum(v["support"] for v in val["per_class"].values()) == 6
    assert (out / "checkpoints" / "model.pt").exists() and not (out / "threshold.json").exists()  # arg-max, no threshold
    run_bundle("femur_fracture", CPU + ["evaluate.yaml"], tmp_path, datalist=data)
    test = json.load(open(out / "test_metrics.json"))
    assert test["n"] == 6 and 0 <= test["accuracy"] <= 1
    run_bundle("femur_fracture", CPU + ["inference.yaml"], tmp_path, datalist=data, input_dir=os.path.join(SAMPLES, "pelvis"))
    rows = list(csv.DictReader(open(out / "inference" / "predictions.csv")))
    assert len(rows) == len([f for f in os.listdir(os.path.join(SAMPLES, "pelvis")) if f.endswith(".dcm") and "_gsps" not in f])
    r = rows[0]
    p = [float(r[f"p_{c}"]) for c in ("normal", "trochanteric", "neck")]
    assert sum(p) == pytest.approx(1, abs=1e-4) and r["prediction"] in ("normal", "trochanteric", "neck")
    assert r["left"] in ("normal", "trochanteric", "neck") and r["right"] in ("normal", "trochanteric", "neck")
    _same_rows(out / "test_predictions.csv", rows, [f"p_{c}" for c in ("normal", "trochanteric", "neck")], 3)
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_db(tmp_path, "mlruns.db"))
    run = client.search_runs([client.get_experiment_by_name("femur_test").experiment_id])[0]
    assert "final_val_normal_f1" in run.data.metrics and run.data.params["label_mode"] == "multiclass"
    assert client.search_model_versions("name='femur_fracture'")[0].run_id == run.info.run_id


@pytest.mark.slow
def test_cxr14_train_evaluate_infer(tmp_path):
    data = tiny_datalist(tmp_path, "chest", n=(8, 4, 4))
    run_bundle("cxr14", CPU, tmp_path, datalist=data, augmentation="cut_remain", num_copies=1, gamma=0.5,
               register_model=False)
    out = tmp_path / "out"
    val = json.load(open(out / "val_metrics.json"))
    assert list(val["per_class"]) == CXR14 and {"map", "cf1", "of1"} <= set(val)
    thresholds = json.load(open(out / "threshold.json"))["thresholds"]
    assert len(thresholds) == 14
    cam = json.load(open(out / "cam_report.json"))
    assert cam["images"] >= 1  # chest phantoms have boxes; the map is drawn for the boxed finding
    run_bundle("cxr14", CPU + ["evaluate.yaml"], tmp_path, datalist=data)
    test = json.load(open(out / "test_metrics.json"))
    assert test["thresholds"] == pytest.approx(thresholds)  # validation thresholds applied unchanged on test
    run_bundle("cxr14", CPU + ["inference.yaml"], tmp_path, datalist=data, input_dir=os.path.join(SAMPLES, "chest"))
    rows = list(csv.DictReader(open(out / "inference" / "predictions.csv")))
    r = rows[0]
    probs = [float(r[f"p_{c}"]) for c in CXR14]
    expected = [c for c, p, t in zip(CXR14, probs, thresholds) if p >= t]
    assert r["prediction"].split("|") == expected or (r["prediction"] == "" and not expected)
    _same_rows(out / "test_predictions.csv", rows, [f"p_{c}" for c in CXR14], 4)


@pytest.mark.slow
def test_cxr14_ddp_two_cpu_processes(tmp_path):
    data = tiny_datalist(tmp_path, "chest", n=(8, 4, 4))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "monai.bundle", "run",
           "--config_file", config_arg(["train.yaml", "cpu.yaml", "multi_gpu_train.yaml"]),
           "--bundle_root", os.path.join(BUNDLES, "cxr14"), "--output_dir", str(out), "--datalist", data,
           "--datalist_task", "None", "--image_size", "[64,64]", "--network_depth", "10", "--epochs", "1",
           "--batch_size", "4", "--cam_images", "0", "--register_model", "False", "--tracking_uri", mlflow_db(tmp_path, "d.db")]
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=os.path.join(BUNDLES, "cxr14"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.load(open(out / "val_metrics.json"))
    assert m["n"] == 4 and len(m["per_class"]) == 14  # every validation image gathered from both ranks


@pytest.mark.slow
def test_gamma_curve_tiny(tmp_path):
    from cutremain_monai.cli import main

    data = tiny_datalist(tmp_path, "pelvis", n=(6, 3, 3))
    out = tmp_path / "gamma"
    overrides = {"image_size": [64, 64], "network_depth": 10, "epochs": 1, "batch_size": 8, "cam_images": 0,
                 "num_copies": 1}
    assert main(["experiment", "gamma", "--bundle", os.path.join(BUNDLES, "femur_fracture"), "--datalist", data,
                 "--gammas", "0,1", "--overrides", json.dumps(overrides), "-o", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "gamma_results.csv")))
    assert [float(r["gamma"]) for r in rows] == [0.0, 1.0] and all(r["auc"] != "" for r in rows)
    assert (out / "gamma_curve.png").stat().st_size > 1000
    table = open(out / "gamma_table.md").read()
    assert "| 0.00 |" in table and "| 1.00 |" in table
    for g in ("0.00", "1.00"):  # each gamma trained and tested in its own folder
        assert json.load(open(out / f"gamma_{g}" / "test_metrics.json"))["n"] == 6
    import mlflow

    from cutremain_monai.handlers.mlflow_registry import default_tracking_uri

    client = mlflow.tracking.MlflowClient(tracking_uri=default_tracking_uri(str(out)))
    exp = client.get_experiment_by_name("gamma_femur_fracture")
    curve = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "gamma_curve"]
    assert len(curve) == 1 and "gamma_curve.png" in {a.path for a in client.list_artifacts(curve[0].info.run_id)}


@pytest.mark.slow
@pytest.mark.parametrize("bundle,task,guidance,variant", [("femur_fracture", "pelvis", "gain", "selective"),
                                                          ("femur_fracture", "pelvis", "isnet", "stochastic"),
                                                          ("cxr14", "chest", "gain", "selective"),
                                                          ("cxr14", "chest", "isnet", "selective")])
def test_guidance_one_epoch(tmp_path, bundle, task, guidance, variant):
    import numpy as np

    data = tiny_datalist(tmp_path, task, n=(6, 3, 3))
    wf, _ = run_bundle(bundle, CPU, tmp_path, datalist=data, guidance=guidance, isnet_variant=variant, guidance_warmup_epochs=0,
                       isnet_band=[1.0, 25.0], augmentation="none", register_model=False)
    trainer = wf.parser.get_parsed_content("train#trainer")
    key = "guidance_loss_heatmap" if guidance == "isnet" else "guidance_loss_e"
    assert trainer.state.epoch == 1 and np.isfinite(trainer.state.metrics[key])
    # the background-swap validation AUC (multi-label on cxr14) and its checkpoint, on for guided runs
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert 0.0 <= evaluator.state.metrics["val_auc_swap"] <= 1.0
    assert (tmp_path / "out" / "checkpoints" / "model_val_auc_swap.pt").exists()
