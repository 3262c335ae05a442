"""covid_severity bundle: one short run per config on the synthetic chest samples (dicom_samples/covid), the
checkpoint ensemble, MLflow registration, lung segmentation, folder inference, self-training, DDP, metadata."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.bundles.conftest import BUNDLES, COVID_TINY, config_arg, run_bundle, tiny_datalist
from tests.conftest import ROOT, SAMPLES, mlflow_db, free_port

CPU = ["train.yaml", "cpu.yaml"]
ZONES = "ABCDEF"


def covid(tmp_path, configs, **kw):
    return run_bundle("covid_severity", configs, tmp_path, tiny=COVID_TINY, **kw)


@pytest.fixture
def covid_data(tmp_path):
    return tiny_datalist(tmp_path, "covid", n=(6, 3, 3))


@pytest.mark.slow
def test_train_ensemble_evaluate_register(tmp_path, covid_data):
    covid(tmp_path, CPU, datalist=covid_data, register_model=True, experiment_name="covid_test")
    out = tmp_path / "out"
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint_epoch=*.pt"))
    assert ckpts == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"] and (out / "checkpoints" / "model.pt").exists()
    val = json.load(open(out / "val_metrics.json"))
    assert {"mse", "mae", "pearson", "r2", "mean_zone_auc", "zone_auc"} <= set(val) and val["n"] == 3
    assert len(list((out / "val_overlays").glob("*.png"))) == 2
    covid(tmp_path, CPU + ["evaluate.yaml"], datalist=covid_data)
    test = json.load(open(out / "test_metrics.json"))
    table = open(out / "test_severity_table.md").read()
    assert test["n"] == 3 and "| model | 3 |" in table
    # the baselines, fitted on the 6 training images, scored on the same 3 test images, with the verdict
    assert set(test["baselines"]) == {"constant", "zone_intensity"} and test["baselines"]["constant"]["n"] == 3
    assert "| baseline: constant | 3 |" in table and "| baseline: zone_intensity | 3 |" in table
    assert ("beats every baseline" in table) == test["beats_baselines"]["all"]
    # the evaluated model is the mean of the last two epochs' models: recompute one sample by hand
    from monai.bundle import ConfigParser

    from cutremain_monai.engines.bundle import bundle_configs
    from cutremain_monai.io import load_datalist

    parser = ConfigParser()
    parser.read_config(bundle_configs(os.path.join(BUNDLES, "covid_severity"), CPU))
    parser.update({"bundle_root": os.path.join(BUNDLES, "covid_severity"), **COVID_TINY})
    net, pre = parser.get_parsed_content("network_def"), parser.get_parsed_content("train#preprocessing")
    test_items = load_datalist(covid_data, "test")
    samples = [pre(it) for it in test_items]
    members = []
    for c in ckpts:
        m = parser.get_parsed_content("network_def", instantiate=True, lazy=False)
        m.load_state_dict(torch.load(out / "checkpoints" / c, weights_only=True)["model"])
        members.append(m.eval())
    with torch.no_grad():
        probs = np.stack([torch.stack([m(s["image"][None], s["lung_mask"][None], s["zones"][None].long())[0] for m in members]).mean(0).numpy()
                          for s in samples])
    from cutremain_monai.metrics.severity import severity_metrics

    expected = severity_metrics([it["zone_scores"] for it in test_items], probs)
    assert test["mse"] == pytest.approx(expected["mse"], rel=1e-4)  # the evaluator used the mean of the 2 members
    assert test["mae"] == pytest.approx(expected["mae"], rel=1e-4)
    s = samples[0]
    # MLflow: registered model loads and takes the packed (image, mask, zones) tensor
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_db(tmp_path, "mlruns.db"))
    run = client.search_runs([client.get_experiment_by_name("covid_test").experiment_id])[0]
    assert "final_val_mean_zone_auc" in run.data.metrics and run.data.params["image_size"] == "64"
    mlflow.set_tracking_uri(mlflow_db(tmp_path, "mlruns.db"))
    model = mlflow.pytorch.load_model("models:/covid_severity/1")
    packed = torch.cat([s["image"], s["lung_mask"], s["zones"].float()])[None]
    best = torch.load(out / "checkpoints" / "model.pt", weights_only=True)  # a single-object save: the bare state dict
    net.load_state_dict(best.get("model", best))
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(packed), net(s["image"][None], s["lung_mask"][None], s["zones"][None].long()))


@pytest.mark.slow
def test_lung_seg_then_inference(tmp_path, covid_data):
    seg_out = tmp_path / "seg"
    covid(tmp_path, ["lung_seg.yaml", "cpu.yaml"], seg_datalist=covid_data, seg_datalist_task=None, output_dir=str(seg_out))
    covid(tmp_path, ["lung_seg.yaml", "cpu.yaml", "lung_seg_evaluate.yaml"], seg_datalist=covid_data,
          seg_datalist_task=None, output_dir=str(seg_out))
    dice = float(open(seg_out / "metrics.csv").read().strip().split(",")[1])
    assert 0.0 <= dice <= 1.0
    raw = list(csv.reader(open(seg_out / "test_dice_raw.csv")))
    assert len(raw) == 4  # header + 3 test images, each row named by its file
    test_files = {os.path.basename(it["image"]) for it in json.load(open(covid_data))["test"]}
    assert {os.path.basename(r[0]) for r in raw[1:]} == test_files
    covid(tmp_path, CPU, datalist=covid_data, register_model=False)
    covid(tmp_path, CPU + ["evaluate.yaml"], datalist=covid_data)
    folder = os.path.join(SAMPLES, "covid")
    n_images = len([f for f in os.listdir(folder) if f.endswith(".dcm")])
    # masks from files
    covid(tmp_path, CPU + ["inference.yaml"], datalist=covid_data, input_dir=folder, mask_dir=folder, mask_suffix="_lungs",
          dicom_out=True, dicom_lung_seg=True)
    rows = list(csv.DictReader(open(tmp_path / "out" / "inference" / "severity.csv")))
    assert len(rows) == n_images and all(r["error"] == "" and r["mask_source"] == "file" for r in rows)
    # DICOM results: an SR with the six zone probabilities and the global score of the CSV, and the overlay as SC
    import pydicom

    from cutremain_monai.io.sr import read_sr_findings
    from tests.conftest import dciodvfy_errors

    manifest = list(csv.DictReader(open(tmp_path / "out" / "inference" / "dicom" / "manifest.csv")))
    assert sorted(m["object"] for m in manifest) == sorted(["SR", "SC", "SEG"] * n_images)
    by_row = {r["file"]: r for r in rows}
    for m in manifest:
        path = str(tmp_path / "out" / "inference" / "dicom" / m["path"])
        assert dciodvfy_errors(path) == [], m
        if m["object"] == "SR":
            found = read_sr_findings(pydicom.dcmread(path))
            row = by_row[m["file"]]
            assert [f["probability"] for f in found[:6]] == pytest.approx([float(row[f"p_{z}"]) for z in ZONES], abs=1e-6)
            assert found[6]["score"] == pytest.approx(float(row["global_score"]), abs=1e-4)
        if m["object"] == "SEG":  # the lung mask it scored in, back on the image grid: the mask file, nearly
            from PIL import Image

            from cutremain_monai.io.seg import read_mask_seg

            seg = read_mask_seg(path)
            stem = os.path.splitext(m["file"])[0]
            truth = np.asarray(Image.open(os.path.join(folder, stem + "_lungs.png")).convert("L")) > 190
            assert seg.shape == truth.shape and (seg & truth).sum() / (seg | truth).sum() > 0.9
    r = rows[0]
    p = [float(r[f"p_{z}"]) for z in ZONES]
    assert float(r["global_score"]) == pytest.approx(sum(p), abs=1e-3)
    assert [int(r[f"zone_{z}"]) for z in ZONES] == [int(v >= 0.5) for v in p]
    assert (tmp_path / "out" / "inference" / r["overlay"]).exists()
    # inference and evaluation share one pipeline and one ensemble: the same zone probabilities for the test images
    evaluated = {os.path.basename(r["file"]): r for r in csv.DictReader(open(tmp_path / "out" / "test_severity.csv"))}
    inferred = {os.path.basename(r["file"]): r for r in rows}
    assert len(evaluated) == 3
    for name, e in evaluated.items():
        for z in ZONES:
            assert float(inferred[name][f"p_{z}"]) == pytest.approx(float(e[f"p_{z}"]), abs=1e-5), (name, z)
    # masks from the (1-epoch) segmenter: every image has a row, failures carry their reason
    covid(tmp_path, CPU + ["inference.yaml"], datalist=covid_data, input_dir=folder, mask_suffix="_lungs",
          seg_checkpoint=str(seg_out / "checkpoints" / "model.pt"), inference_dir=str(tmp_path / "inf2"))
    rows = list(csv.DictReader(open(tmp_path / "inf2" / "severity.csv")))
    assert len(rows) == n_images and all(r["mask_source"] == "segmented" for r in rows if not r["error"])
    assert all(r["error"] == "" or "LungZoneError" in r["error"] for r in rows)


@pytest.mark.slow
def test_self_training_rounds(tmp_path, covid_data):
    from cutremain_monai.experiments.self_training import progressive_self_training, read_schedule
    from cutremain_monai.io import load_datalist

    assert read_schedule(os.path.join(BUNDLES, "covid_severity"))["schedule"] == [0.3, 0.6, 1.0]
    with open(os.path.join(SAMPLES, "datalist.json")) as f:
        extra = json.load(f)["covid"]["training"][-4:]  # images not in the tiny datalist: the unlabelled pool
    for it in extra:
        it["image"], it["lung_mask"] = os.path.join(SAMPLES, it["image"]), os.path.join(SAMPLES, it["lung_mask"])
        it.pop("zone_scores")
    held = load_datalist(covid_data, "test")[0]
    leak = {**held, "group": held["group"]}  # same patient as a test image: must be left out
    # the same radiograph as a test image, resized and saved as PNG under another patient: must be left out too
    from PIL import Image

    from cutremain_monai.io.loader import load_xray

    arr = (load_xray(held["image"]).numpy()[0] * 255).astype("uint8")
    copy_path = str(tmp_path / "copy_of_test_image.png")
    Image.fromarray(arr).resize((arr.shape[1] * 3 // 4, arr.shape[0] * 3 // 4), Image.LANCZOS).save(copy_path)
    copy = {**held, "image": copy_path, "group": "another-patient-id"}
    rows = progressive_self_training(os.path.join(BUNDLES, "covid_severity"), covid_data, extra + [leak, copy],
                                     str(tmp_path / "st"), schedule=[0.5, 1.0], configs=CPU, **{**COVID_TINY, "epochs": 1})
    assert [r["round"] for r in rows] == [0, 1, 2] and [r["unlabelled_used"] for r in rows] == [0, 2, 4]
    dl = json.load(open(tmp_path / "st" / "round2" / "datalist.json"))
    pseudo = [it for it in dl["training"] if it.get("pseudo")]
    assert len(pseudo) == 4 and held["image"] not in {it["image"] for it in pseudo}
    for it in pseudo:
        assert it["zone_scores"] == [int(p >= 0.5) for p in it["pseudo_probabilities"]]
    assert "| 2 | 4 |" in open(tmp_path / "st" / "self_training.md").read()
    with open(tmp_path / "st" / "unlabelled_left_out.csv") as f:
        left_out = {r["image"]: r["reason"] for r in csv.DictReader(f)}
    assert left_out[held["image"]] == "patient group in validation/test"
    assert left_out[copy_path].startswith(f"near-duplicate of held-out image {os.path.basename(held['image'])}")


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, covid_data):
    out = tmp_path / "ddp"
    args = []
    for k, v in COVID_TINY.items():
        args += [f"--{k}", str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "monai.bundle", "run",
           "--config_file", config_arg(["train.yaml", "cpu.yaml", "multi_gpu_train.yaml"]),
           "--bundle_root", os.path.join(BUNDLES, "covid_severity"), "--output_dir", str(out), "--datalist", covid_data,
           "--datalist_task", "None", "--register_model", "False", *args, "--epochs", "1", "--overlays", "0"]
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=os.path.join(BUNDLES, "covid_severity"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.load(open(out / "val_metrics.json"))["n"] == 3  # gathered from both ranks
    assert len(list((out / "checkpoints").glob("checkpoint_epoch=*.pt"))) == 1


@pytest.mark.slow
def test_tracking_mlflow_flag(tmp_path, covid_data):
    """`monai.bundle run --tracking mlflow`: per-epoch validation metric, artifacts and the registered model in one run."""
    db = mlflow_db(tmp_path, "t.db")
    cdir = os.path.join(BUNDLES, "covid_severity", "configs")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg(CPU),
           "--meta_file", os.path.join(cdir, "metadata.json"), "--logging_file", os.path.join(cdir, "logging.conf"),
           "--bundle_root", os.path.join(BUNDLES, "covid_severity"), "--output_dir", str(tmp_path / "out"),
           "--datalist", covid_data, "--datalist_task", "null", "--image_size", "64", "--epochs", "2", "--batch_size", "4",
           "--tracking", "mlflow", "--tracking_uri", db]
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.join(BUNDLES, "covid_severity"), timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=db, registry_uri=db)
    runs = client.search_runs([client.get_experiment_by_name("covid_severity").experiment_id])
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_mean_zone_auc")] == [1, 2]
    names = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"val_overlays", "val_severity_table.md"} <= names and any(n.startswith("config_") for n in names)
    assert client.search_model_versions("name='covid_severity'")[0].run_id == runs[0].info.run_id


@pytest.mark.slow
def test_isnet_with_lung_masks(tmp_path, covid_data):
    """guidance isnet: a warm-up epoch calibrates the band from the lung-masked maps, a guided epoch trains on
    (1 - P) BCE + P L_H, the terms reach the trainer's metrics and MLflow, and the band is in the checkpoint."""
    wf, _ = covid(tmp_path, CPU, datalist=covid_data, guidance="isnet", guidance_warmup_epochs=1, register_model=True,
                  experiment_name="covid_isnet")
    trainer = wf.parser.get_parsed_content("train#trainer")
    c1, c2 = trainer.state.metrics["isnet_c1"], trainer.state.metrics["isnet_c2"]
    assert 0 < c1 < c2
    assert all(np.isfinite(trainer.state.metrics[f"guidance_{t}"]) for t in ("loss_cl", "loss_heatmap"))
    saved = torch.load(tmp_path / "out" / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=False)
    assert saved["guidance"]["band"] == [c1, c2]
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_db(tmp_path, "mlruns.db"))
    run = client.search_runs([client.get_experiment_by_name("covid_isnet").experiment_id])[0]
    assert run.data.params["guidance"] == "isnet" and run.data.tags["mlflow.runName"] == "severity+isnet"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_heatmap")]
    assert steps == [3, 4]  # 6 training images, batch 4: iterations 3 and 4 are the guided epoch's
    relevance = sorted(os.listdir(tmp_path / "out" / "val_relevance_overlays"))
    assert relevance == ["relevance_000.png", "relevance_001.png"]  # LRP overlays of the validation images
    assert "val_relevance_overlays" in {a.path for a in client.list_artifacts(run.info.run_id)}
    with pytest.raises(Exception) as err:  # (MONAI wraps the component's error)
        covid(tmp_path / "gain", CPU, datalist=covid_data, guidance="gain")
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("guidance must be one of none, isnet; got 'gain'" in m for m in chain), chain


@pytest.mark.slow
def test_severity_guidance_experiment(tmp_path, covid_data):
    """`cutremain experiment severity-guidance`: none and isnet trained, evaluated and scored; the share of the LRP
    relevance outside the lungs is the one of outside_lung_share on the best model."""
    from cutremain_monai.cli import main

    overrides = json.dumps({**COVID_TINY, "guidance_warmup_epochs": 1})
    assert main(["experiment", "severity-guidance", "--bundle", os.path.join(BUNDLES, "covid_severity"), "--datalist", covid_data,
                 "--overrides", overrides, "-o", str(tmp_path / "sg")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sg" / "severity_guidance.csv")))
    assert [r["guidance"] for r in rows] == ["none", "isnet"] and all(r["n_test"] == "3" for r in rows)
    for r in rows:
        assert 0 <= float(r["outside_lung_low"]) <= float(r["outside_lung_relevance"]) <= float(r["outside_lung_high"]) <= 1
        test = json.load(open(tmp_path / "sg" / r["guidance"] / "test_metrics.json"))
        assert float(r["mse"]) == pytest.approx(test["mse"])
    assert "| isnet | 3 |" in open(tmp_path / "sg" / "severity_guidance.md").read()
