"""lesion_segmentation bundle: PSL training on pseudo-masks with the online refresh (the bank of refreshed maps is
in the checkpoint), SEC's losses in the step, evaluation of its lesion maps against the boxes, folder inference
writing masks at each image's own size and a DICOM Segmentation that dciodvfy accepts."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.bundles.conftest import LS_TINY, run_bundle, tiny_datalist
from tests.conftest import SAMPLES, dciodvfy_errors, free_port

CPU = ["train.yaml", "cpu.yaml"]


def _pseudo_mask_datalist(tmp_path) -> str:
    """The clavicle phantoms with a pseudo-mask per fractured training image (its fracture boxes as the lesion, a
    ring of ignore around them, background elsewhere): what `cutremain experiment psl` hands the bundle."""
    from cutremain_monai.io.loader import load_xray

    dl = tiny_datalist(tmp_path, "clavicle", n=(8, 4, 4))
    data = json.load(open(dl))
    for it in data["training"]:
        if it["label"] != 1:
            continue
        h, w = load_xray(it["image"]).shape[-2:]
        pm = np.zeros((h, w), np.uint8)
        for (x0, y0, x1, y1), lab in zip(it["boxes"], it["box_labels"]):
            if lab == "fracture":
                pm[max(0, int(y0) - 4):int(y1) + 4, max(0, int(x0) - 4):int(x1) + 4] = 255
                pm[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = 1
        path = tmp_path / (os.path.basename(it["image"]) + "_seg.png")
        Image.fromarray(pm).save(path)
        it["seg_label"] = str(path)
    with open(dl, "w") as f:
        json.dump({k: data[k] for k in ("training", "validation", "test")}, f)
    return dl


@pytest.mark.slow
@pytest.mark.parametrize("sec", [False, True])
def test_train_refresh_evaluate(tmp_path, sec):
    dl = _pseudo_mask_datalist(tmp_path)
    wf, _ = run_bundle("lesion_segmentation", CPU, tmp_path, tiny=LS_TINY, datalist=dl, register_model=False, sec=sec,
                       flip_prob=0.0)
    trainer = wf.parser.get_parsed_content("train#trainer")
    metrics = trainer.state.metrics
    assert {"psl_seed", "psl_cls"} <= set(metrics) and ({"psl_expand", "psl_constrain"} <= set(metrics)) == sec
    assert 0 < metrics["psl_labelled_share"] <= 1
    bank = wf.parser.get_parsed_content("bank")
    assert len(bank) == 4 and bank.refreshes == 2  # refreshed after epochs 1 and 2, the 4 fractured images
    ckpt = [f for f in os.listdir(tmp_path / "out" / "checkpoints") if f.startswith("checkpoint")]
    state = torch.load(tmp_path / "out" / "checkpoints" / ckpt[0], weights_only=False)
    assert state["bank"]["refreshes"] == 2 and len(state["bank"]["maps"]) == 4  # resumes with its refreshed maps
    # a refreshed map keeps its labelled pixels (the fracture box stays lesion)
    fractured = next(it for it in json.load(open(dl))["training"] if "seg_label" in it)
    initial = np.asarray(wf.parser.get_parsed_content("preprocessing")(dict(fractured))["seg_label"])[0]
    refreshed = bank.get(fractured["image"]).numpy()
    assert ((refreshed == 1) | (initial != 1)).all() and ((refreshed == 0) | (initial != 0)).all()
    # and the training chain hands the refreshed map, not the initial one, to the next batch
    item = next(it for it in wf.parser.get_parsed_content("train#dataset").data if it["image"] == fractured["image"])
    sample = wf.parser.get_parsed_content("train#preprocessing")(dict(item))
    np.testing.assert_array_equal(np.asarray(sample["seg_label"])[0], refreshed)
    assert not any(os.sep in k for k in state["bank"]["maps"])  # keyed by a digest: no file path in the checkpoint
    run_bundle("lesion_segmentation", CPU + ["evaluate.yaml"], tmp_path, tiny=LS_TINY, datalist=dl, sec=sec)
    report = json.load(open(tmp_path / "out" / "test_psl_localization.json"))
    assert set(report["methods"]) == {"psl"} and report["methods"]["psl"]["n"] == 2
    assert "psl" in report["validation_tau"]


def test_inference_writes_masks_at_native_size_and_a_valid_dicom_seg(tmp_path):
    from monai.bundle import ConfigParser

    from tests.bundles.conftest import BUNDLES

    root = os.path.join(BUNDLES, "lesion_segmentation")
    parser = ConfigParser()
    parser.read_config([os.path.join(root, "configs", n) for n in CPU])
    parser.update({"bundle_root": root, **LS_TINY})
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    with torch.no_grad():
        net.seg_head.bias[1] = 5.0  # a network that calls lesion wherever its class head lets it
    torch.save(net.state_dict(), tmp_path / "model.pt")
    folder = tmp_path / "export"
    folder.mkdir()
    src = os.path.join(SAMPLES, "clavicle", "clavicle_001.dcm")
    (folder / "IM0001").write_bytes(open(src, "rb").read())
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    run_bundle("lesion_segmentation", CPU + ["inference.yaml"], tmp_path, tiny=LS_TINY, workflow_type="infer",
               input_dir=str(folder), model_path=str(tmp_path / "model.pt"), min_score=0.0)
    out = tmp_path / "out" / "inference"
    rows = {r["file"]: r for r in csv.DictReader(open(out / "lesions.csv"))}
    skipped = {r["file"]: r["reason"] for r in csv.DictReader(open(out / "skipped.csv"))}
    assert set(rows) | set(skipped) == {"IM0001", "broken.png"} and (rows.get("broken.png") or {"error": skipped.get("broken.png")})["error"]
    import pydicom

    ds = pydicom.dcmread(src)
    mask = np.asarray(Image.open(out / "masks" / "IM0001.png"))
    assert mask.shape == (ds.Rows, ds.Columns) and set(np.unique(mask)) <= {0, 1}
    assert int(rows["IM0001"]["area_px"]) == int((mask == 1).sum())
    assert (mask == 1).mean() > 0.5  # the lesion channel wins: a Segmentation is written
    seg = out / "seg" / "IM0001.dcm"
    assert seg.exists() and dciodvfy_errors(str(seg)) == []
    s = pydicom.dcmread(seg)
    assert s.PatientID == ds.PatientID and s.StudyInstanceUID == ds.StudyInstanceUID
    assert s.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion"
    assert "InstitutionName" not in s
    from cutremain_monai.io.seg import read_mask_seg

    np.testing.assert_array_equal(read_mask_seg(seg), mask == 1)


@pytest.mark.slow
def test_ddp_two_cpu_processes_refresh_and_checkpoint(tmp_path):
    """torchrun with two gloo processes: the step goes through DDP (return_parts), each rank refreshes the whole bank
    and rank 0's checkpoint holds it."""
    import subprocess
    import sys

    from tests.bundles.conftest import BUNDLES, config_arg
    from tests.conftest import ROOT

    dl = _pseudo_mask_datalist(tmp_path)
    out = tmp_path / "ddp"
    args = []
    for k, v in LS_TINY.items():
        args += [f"--{k}", json.dumps(v) if isinstance(v, list) else str(v)]
    root = os.path.join(BUNDLES, "lesion_segmentation")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "monai.bundle",
           "run", "--config_file", config_arg(["train.yaml", "cpu.yaml", "multi_gpu_train.yaml"]), "--bundle_root", root,
           "--output_dir", str(out), "--datalist", dl, "--datalist_task", "null", "--register_model", "False", *args]
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = list((out / "checkpoints").glob("checkpoint_epoch=*.pt"))
    assert len(ckpt) == 1
    state = torch.load(ckpt[0], weights_only=False)
    assert state["bank"]["refreshes"] == 2 and len(state["bank"]["maps"]) == 4
