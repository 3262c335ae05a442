"""background_learning bundle: patch classifier, whole-image CAM baseline, evaluation (Loc. Acc. per threshold and at
the validation-chosen one, the P / F / N histogram, the comparison table), folder inference with boxes in the
image's pixels, DDP; and the effect the method claims on synthetic scenes (tests/.. the experiment runner)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.bundles.conftest import BG_TINY, BUNDLES, config_arg, run_bundle
from tests.conftest import ROOT, mlflow_db, free_port

CPU = ["train.yaml", "cpu.yaml"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from cutremain_monai.data.phantoms import generate_background_samples

    root = tmp_path_factory.mktemp("scenes")
    generate_background_samples(str(root), n=30, size=64)
    return str(root / "datalist.json")


def bg(tmp_path, configs, datalist, **kw):
    return run_bundle("background_learning", configs, tmp_path, tiny=BG_TINY, datalist=datalist, datalist_task="background",
                      target_box_labels=["target"], cam_output_dir=str(tmp_path / "cam"), **kw)


@pytest.mark.slow
def test_train_cam_evaluate_infer(tmp_path, scenes):
    wf, _ = bg(tmp_path, CPU, scenes, register_model=True, experiment_name="bg")
    plan = wf.parser.get_parsed_content("train#plan")
    items = json.load(open(scenes))["background"]["training"]
    n_t = sum(it["label"] for it in items)
    assert plan[1] == max(1, round(8 * n_t / (len(items) - n_t)))  # BG x1: as many background patches as target ones
    assert (tmp_path / "out" / "checkpoints" / "model.pt").exists()
    bg(tmp_path, [*CPU, "train_cam.yaml"], scenes, output_dir=str(tmp_path / "cam"))  # (the helper sets output_dir)
    assert (tmp_path / "cam" / "checkpoints" / "model.pt").exists()
    wf, _ = bg(tmp_path, [*CPU, "evaluate.yaml"], scenes)
    out = tmp_path / "out"
    test = json.load(open(scenes))["background"]["test"]
    targets = [it for it in test if it["label"] == 1]
    for prefix, method in (("test_targetness", "targetness"), ("test_cam", "cam")):
        rep = json.load(open(out / f"{prefix}_localization.json"))
        t = rep["methods"][method]
        assert t["n"] == len(targets) and len(t["loc_acc_by_tau"]) == 10
        assert rep["validation_tau"][method] in {float(k) for k in t["loc_acc_by_tau"]}  # tau chosen on validation
        assert t["loc_acc"] == pytest.approx(t["loc_acc_by_tau"][f"{rep['validation_tau'][method]:.2f}"])
    pfn = json.load(open(out / "test_pfn_histogram.json"))
    assert pfn["N"]["n"] == 8 * (len(test) - len(targets)) and pfn["P"]["n"] + pfn["F"]["n"] == 8 * len(targets)
    assert all(sum(pfn[k]["relative_frequency"]) == pytest.approx(1.0) for k in "PFN" if pfn[k]["n"])
    assert (out / "test_pfn_histogram.png").exists()
    table = open(out / "test_loc_acc_table.md").read()
    assert "targetness (BG x1)" in table and "CAM (cam" in table
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    assert 0 <= metrics["test_auc"] <= 1
    # folder inference: one row per image, boxes inside the image's own pixels, the validation tau
    folder = os.path.dirname(scenes) + "/background"
    # (maps at 32 px for 64 px images: the boxes must come back to the images' pixels)
    run_bundle("background_learning", [*CPU, "inference.yaml"], tmp_path, tiny={**BG_TINY, "image_size": 32, "patch_size": 8},
               workflow_type="infer", input_dir=folder, datalist=scenes, datalist_task="background", inference_min_score=0.0)
    rows = list(csv.DictReader(open(out / "inference" / "targetness.csv")))
    assert len(rows) == 30 and all(not r["error"] for r in rows)
    tau = json.load(open(out / "test_targetness_localization.json"))["validation_tau"]["targetness"]
    assert all(float(r["tau"]) == pytest.approx(tau) for r in rows)
    assert all(0 <= float(r["target_score"]) <= 1 for r in rows) and len({r["target_score"] for r in rows}) > 1
    boxed = [r for r in rows if r["x0"] != ""]
    assert len(boxed) == 30  # min_score 0: every image gets its box
    assert all(0 <= float(r["x0"]) < float(r["x1"]) <= 64 and 0 <= float(r["y0"]) < float(r["y1"]) <= 64 for r in boxed)
    assert max(float(r["x1"]) for r in boxed) > 32 and max(float(r["y1"]) for r in boxed) > 32
    assert len(os.listdir(out / "inference" / "overlays")) == 30
    m = np.load(out / "inference" / "maps" / (rows[0]["file"].replace("/", "__") + ".npy"))
    assert m.shape == (32, 32) and m.min() == 0 and m.max() == pytest.approx(1.0)
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_db(tmp_path, "mlruns.db"))
    run = client.search_runs([client.get_experiment_by_name("bg").experiment_id])[0]
    assert run.data.params["bg_ratio"] == "1" and run.data.params["patch_size"] == "12"


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, scenes):
    out = tmp_path / "ddp"
    args = []
    for k, v in {**BG_TINY, "epochs": 1}.items():
        args += [f"--{k}", str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "monai.bundle", "run",
           "--config_file", config_arg(["train.yaml", "cpu.yaml", "multi_gpu_train.yaml"]),
           "--bundle_root", os.path.join(BUNDLES, "background_learning"), "--output_dir", str(out), "--datalist", scenes,
           "--datalist_task", "background", "--register_model", "False", *args]
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=os.path.join(BUNDLES, "background_learning"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoints" / "model.pt").exists() and "val_auc" in proc.stdout + proc.stderr


def test_background_plan_modes_in_the_bundle(tmp_path, scenes):
    """bg_ratio 4 by more patches per background image, or by repeating the background images."""
    from cutremain_monai.engines.bundle import bundle_parser

    parser = bundle_parser(os.path.join(BUNDLES, "background_learning"), CPU, datalist=scenes, datalist_task="background",
                           bg_ratio=4)
    items, k = parser.get_parsed_content("train#plan")
    n_t = sum(it["label"] for it in items)
    assert k == round(4 * 8 * n_t / (len(items) - n_t))
    parser = bundle_parser(os.path.join(BUNDLES, "background_learning"), CPU, datalist=scenes, datalist_task="background",
                           bg_ratio=4, bg_mode="images")
    items, k = parser.get_parsed_content("train#plan")
    assert k == 8 and sum(1 - it["label"] for it in items) == 4 * sum(it["label"] for it in items)
    assert np.isclose(len(items), 5 * n_t)


@pytest.mark.slow
def test_background_learning_localises_where_cam_does_not(tmp_path):
    """The seed's claim, small: on 80 synthetic scenes (64 px, targets boxed in 3-8% of the image), BG x1 targetness
    maps reach a higher Loc. Acc. than CAM of a whole-image ResNet-10 trained on the same images (whose 2 x 2 CAM
    grid at 64 px cannot outline the target); and the target patches (P) look less like background than the
    mislabelled ones (F). Measured when written (seed 0): BG x1 0.375, CAM 0.000 on the 8 test targets; P 0.525,
    F 0.584, N 0.554. The bounds are loose on purpose."""
    from cutremain_monai.data.phantoms import generate_background_samples
    from cutremain_monai.experiments.background_learning import background_experiment

    generate_background_samples(str(tmp_path / "scenes"), n=80, size=64)
    rows = background_experiment(os.path.join(BUNDLES, "background_learning"), str(tmp_path / "scenes" / "datalist.json"),
                                 str(tmp_path / "out"), ratios=(1,), task="background", target_box_labels=["target"],
                                 image_size=64, patch_size=12, window_stride=4, epochs=30, images_per_batch=8,
                                 num_workers=0, overlays=0, window_batch=512)
    cam, bg1 = rows
    assert cam["maps"].startswith("CAM") and bg1["maps"] == "targetness BG x1"
    assert bg1["loc_acc"] >= cam["loc_acc"] + 0.25, rows
    assert bg1["backgroundness_P"] < bg1["backgroundness_F"], rows
    assert bg1["image_auc"] > 0.8
    assert "| targetness BG x1 |" in open(tmp_path / "out" / "background_table.md").read()
