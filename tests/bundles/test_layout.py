"""Every bundle is a self-contained MONAI bundle in the model-zoo layout: the files are there, the configs refer to
nothing outside the bundle, the YAML shared by the classification bundles stays identical, and the model-zoo
checks pass (verify_metadata offline, verify_net_in_out, ckpt_export + torch.jit.load against the checkpoint,
ConfigWorkflow.check_properties for train and infer). Each bundle also trains one short epoch from a copy of its
folder outside the repository, on a datalist with a truncated image, a missing file and a non-image DICOM, and
names all three in set_aside.csv."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tests.bundles.conftest import BG_TINY, BUNDLES, COVID_TINY, LS_TINY, TINY, config_arg, tiny_datalist
from tests.conftest import ROOT, SAMPLES, SHARED_MONAI, mlflow_db

CLASSIFICATION = ["clavicle_fracture", "femur_fracture", "cxr14"]
ALL = CLASSIFICATION + ["covid_severity", "background_learning", "lesion_segmentation"]
MARKER = "# ==== shared classification workflow"
TASKS = {"clavicle_fracture": "clavicle", "femur_fracture": "pelvis", "cxr14": "chest", "covid_severity": "covid",
         "background_learning": "clavicle", "lesion_segmentation": "clavicle"}


def _env():
    return dict({k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, PYTHONPATH=ROOT)


def _args(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [f"--{k}", json.dumps(v) if isinstance(v, list) else str(v)]
    return out


def _tiny(bundle):
    return {"covid_severity": COVID_TINY, "background_learning": BG_TINY, "lesion_segmentation": LS_TINY}.get(bundle, TINY)


@pytest.mark.parametrize("bundle", ALL)
def test_model_zoo_layout(bundle):
    root = os.path.join(BUNDLES, bundle)
    for f in ("configs/metadata.json", "configs/train.yaml", "configs/evaluate.yaml", "configs/inference.yaml",
              "configs/multi_gpu_train.yaml", "configs/logging.conf", "configs/cpu.yaml", "docs/README.md", "LICENSE",
              "models/README.md"):
        assert os.path.isfile(os.path.join(root, f)), f"{bundle}: {f} missing"
    for name in os.listdir(os.path.join(root, "configs")):
        text = open(os.path.join(root, "configs", name)).read()
        code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # comments may name other bundles
        assert "bundles/" not in code and "common" not in code and "../" not in code, f"{bundle}/configs/{name}"
    meta = json.load(open(os.path.join(root, "configs", "metadata.json")))
    assert "eval_metrics" not in meta or all(v != 0.0 for v in meta["eval_metrics"].values())  # no placeholders


def test_shared_classification_yaml_identical():
    texts = {b: open(os.path.join(BUNDLES, b, "configs", "train.yaml")).read() for b in CLASSIFICATION}
    shared = {b: t[t.index(MARKER):] for b, t in texts.items()}
    assert len(set(shared.values())) == 1, "the shared section of train.yaml differs between bundles"
    task = {b: t[: t.index(MARKER)] for b, t in texts.items()}
    assert len(set(task.values())) == 3  # and the task sections do differ
    for name in ("evaluate.yaml", "inference.yaml", "multi_gpu_train.yaml", "logging.conf", "cpu.yaml", "gpu.yaml"):
        files = {open(os.path.join(BUNDLES, b, "configs", name)).read() for b in CLASSIFICATION}
        assert len(files) == 1, f"{name} differs between the classification bundles"


def _config_code(path: str) -> str:
    """A bundle config file without its comments (a YAML comment starts a line or follows a blank; `#` inside a
    reference such as ``@validate#handlers`` is the id separator and stays)."""
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in open(path).read().splitlines())


@pytest.mark.parametrize("bundle", ALL)
def test_configs_refer_to_items_by_id_not_list_position(bundle):
    """No reference (``@validate#handlers#1``) or override key (``handlers#0#enabled:``) names a list element by its
    place, and no expression indexes or slices a handlers list (``$@train#handlers[1]``): inserting a handler would
    silently shift them. A shared component is a named item that the list and its other users refer to
    (``validate#checkpoint_saver``, ``predictions_writer``). The activation transform is defined once per bundle."""
    configs = os.path.join(BUNDLES, bundle, "configs")
    names = sorted(n for n in os.listdir(configs) if n.endswith((".yaml", ".yml", ".json")))
    activations = []
    for name in names:
        code = _config_code(os.path.join(configs, name))
        by_place = re.findall(r"[\w@]+(?:#\w+)*#\d+\b", code)
        assert not by_place, f"{bundle}/configs/{name}: list-position reference(s) {by_place}"
        indexed = re.findall(r"@[\w#]*handlers\s*\[", code)
        assert not indexed, f"{bundle}/configs/{name}: indexes a handlers list {indexed}"
        activations += [name] * len(re.findall(r"\bActivationsd\b", code))
    assert len(activations) <= 1, f"{bundle}: Activationsd defined {len(activations)} times ({activations})"


@pytest.mark.parametrize("bundle", ALL)
def test_check_properties(tmp_path, bundle):
    from monai.bundle import ConfigWorkflow

    from cutremain_monai.engines.bundle import bundle_configs, bundle_files

    root = os.path.join(BUNDLES, bundle)
    dl = tiny_datalist(tmp_path, TASKS[bundle], n=(2, 2, 2))
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(json.load(open(dl))["test"][0]["image"], folder)
    settings = {**_tiny(bundle), "datalist": dl, "datalist_task": None, "input_dir": str(folder),
                "output_dir": str(tmp_path / "out")}
    if bundle == "covid_severity":  # its evaluator holds the checkpoint ensemble: give it one checkpoint
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(bundle_configs(root, ["train.yaml", "cpu.yaml"]))
        parser.update({"bundle_root": root, **_tiny(bundle)})
        torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
        settings.update(ensemble_last=0, model_path=str(tmp_path / "model.pt"))
    for kind, names in (("train", ["train.yaml", "cpu.yaml"]), ("infer", ["train.yaml", "cpu.yaml", "inference.yaml"])):
        wf = ConfigWorkflow(config_file=bundle_configs(root, names), workflow_type=kind, bundle_root=root,
                            **bundle_files(root), **settings)
        wf.initialize()
        assert wf.check_properties() == [], f"{bundle} {kind}"


@pytest.mark.parametrize("bundle", ["clavicle_fracture", "femur_fracture", "cxr14"])
def test_mix_settings_reach_the_batch_augmentation(bundle):
    """mixup_prob / cutmix_prob / mixup_alpha / cutmix_label_rule of train.yaml are the parameters of the batch
    augmentation the trainer runs (a setting that is parsed but not passed would train the default silently)."""
    from monai.bundle import ConfigParser

    from cutremain_monai.engines.bundle import bundle_configs

    root = os.path.join(BUNDLES, bundle)
    for aug, settings, expected in (("sup_mixup", {"mixup_prob": 0.25, "mixup_alpha": 0.4}, {"prob": 0.25, "alpha": 0.4}),
                                    ("sup_cutmix", {"cutmix_prob": 0.6, "cutmix_label_rule": "area"},
                                     {"prob": 0.6, "label_rule": "area"})):
        parser = ConfigParser()
        parser.read_config(bundle_configs(root, ["train.yaml"]))
        parser.update({"bundle_root": root, "augmentation": aug, **settings})
        mixer = parser.get_parsed_content("train#batch_augmentation").mixer
        assert {k: getattr(mixer, k) for k in expected} == expected, (bundle, aug)


@pytest.mark.parametrize("bundle", ALL)
def test_verify_metadata(bundle):
    schema = os.path.join(SHARED_MONAI, "meta_schema_20240725.json")
    if not os.path.exists(schema):  # MONAI would download it, which these machines cannot do
        pytest.skip(f"offline metadata schema not available: {schema}")
    from monai.bundle import verify_metadata

    # MONAI's own check, in this process (the command `python -m monai.bundle verify_metadata` calls the same
    # function; a process start costs more than the check): it raises ValueError naming the failed rule
    verify_metadata(meta_file=os.path.join(BUNDLES, bundle, "configs", "metadata.json"), filepath=schema)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ALL)
def test_net_in_out_and_export(tmp_path, bundle):
    root = os.path.join(BUNDLES, bundle)
    meta = os.path.join(root, "configs", "metadata.json")
    from monai.bundle import ConfigParser

    covid = bundle == "covid_severity"
    net_id = "packed_network_def" if covid else "network_def"
    size = json.load(open(meta))["network_data_format"]["inputs"]["image"]["spatial_shape"]
    overrides = {"image_size": size[0]} if covid else {"network_depth": 10, "image_size": size}
    if bundle == "background_learning":  # the network takes patches
        overrides = {"backbone": "resnet10", "patch_size": size[0]}
    parser = ConfigParser()
    parser.read_config([os.path.join(root, "configs", n) for n in ("train.yaml", "cpu.yaml")])
    parser.update({"bundle_root": root, **overrides})
    net = parser.get_parsed_content("network_def", instantiate=True).eval()
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)  # a training checkpoint as the bundle writes it (best: bare state dict)
    # MONAI's checks in this process (the commands `python -m monai.bundle verify_net_in_out / ckpt_export` call the
    # same functions; each raises ValueError on a mismatch); the bundle run from its own folder by the command line is
    # test_copy_outside_repository_trains_and_sets_bad_files_aside
    from monai.bundle import ckpt_export, verify_net_in_out

    configs = [os.path.join(root, "configs", n) for n in ("train.yaml", "cpu.yaml")]
    verify_net_in_out(net_id, meta_file=meta, config_file=configs, n=1, bundle_root=root, **overrides)
    # ckpt_export to a copy's models/model.ts (the model-zoo place), then TorchScript equals the checkpoint
    copy = tmp_path / bundle
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("outputs"))
    ts = copy / "models" / "model.ts"
    # (covid: a packed 3-channel input; lesion_segmentation: forward's return_parts switch, which script cannot type)
    trace = {"use_trace": True, "input_shape": [1, 3 if covid else 1, size[0], size[1]]} \
        if covid or bundle == "lesion_segmentation" else {}
    ckpt_export(net_id, filepath=str(ts), ckpt_file=str(ckpt), meta_file=str(copy / "configs" / "metadata.json"),
                config_file=[str(copy / "configs" / n) for n in ("train.yaml", "cpu.yaml")], bundle_root=str(copy),
                **trace, **overrides)
    assert ts.exists()
    scripted = torch.jit.load(str(ts))
    torch.manual_seed(0)
    if covid:
        from cutremain_monai.data.phantoms import phantom_lung_zone_maps
        from cutremain_monai.networks import PackedSeverityViT

        zones = torch.as_tensor(phantom_lung_zone_maps(2, size[0]))[:, None].float()
        x = torch.cat([torch.rand(2, 1, *size), (zones > 0).float(), zones], 1)
        reference = PackedSeverityViT(net).eval()
    else:
        x, reference = torch.rand(2, 1, *size), net
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), reference(x))


def _bad_items(tmp_path, bundle) -> tuple[list[dict], list[str]]:
    """A truncated JPEG, a missing file and a presentation state (a DICOM without pixels) as training items."""
    import numpy as np
    from PIL import Image

    good = tmp_path / "good.jpg"
    Image.fromarray((np.random.default_rng(0).random((64, 128)) * 255).astype("uint8")).save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    gsps = next(os.path.join(SAMPLES, "clavicle", f) for f in sorted(os.listdir(os.path.join(SAMPLES, "clavicle")))
                if f.endswith("_gsps.dcm"))
    paths = [str(truncated), str(tmp_path / "missing.dcm"), gsps]
    label = {"femur_fracture": 0, "cxr14": [0] * 14}.get(bundle, 0)
    extra = {"lung_mask": os.path.join(SAMPLES, "covid", "covid_000_lungs.png"), "zone_scores": [0] * 6} \
        if bundle == "covid_severity" else {}
    return [{"image": p, "label": label, "boxes": [], "box_labels": [], **extra} for p in paths], paths


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ALL)
def test_copy_outside_repository_trains_and_sets_bad_files_aside(tmp_path, bundle):
    copy = tmp_path / "elsewhere" / bundle
    shutil.copytree(os.path.join(BUNDLES, bundle), copy, ignore=shutil.ignore_patterns("outputs"))
    n = (6, 3, 3) if bundle in ("femur_fracture", "covid_severity") else (6, 4, 4)
    dl = tiny_datalist(tmp_path, TASKS[bundle], n=n)
    data = json.load(open(dl))
    bad, paths = _bad_items(tmp_path, bundle)
    data["training"] += bad
    with open(dl, "w") as f:
        json.dump({k: data[k] for k in ("training", "validation", "test")}, f)
    db = mlflow_db(tmp_path, "mlruns.db")
    settings = {**_tiny(bundle), "epochs": 1, "register_model": "True", "datalist": dl, "datalist_task": "null",
                "tracking_uri": db, "experiment_name": "copy"}
    if bundle in ("covid_severity", "background_learning", "lesion_segmentation"):
        settings["overlays"] = 0
    else:
        settings["cam_images"] = 0
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg(["train.yaml", "cpu.yaml"]),
                           *_args(settings)], capture_output=True, text=True, cwd=copy, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Not all config files are in" not in proc.stdout + proc.stderr
    out = copy / "outputs" / {"covid_severity": "severity", "background_learning": "bg_x1",
                              "lesion_segmentation": "psl"}.get(bundle, "cut_remain")
    assert (out / "checkpoints" / "model.pt").exists()
    assert bundle in ("background_learning", "lesion_segmentation") or (out / "val_metrics.json").exists()
    rows = list(csv.DictReader(open(out / "set_aside.csv")))
    assert [r["file"] for r in rows] == paths and {r["section"] for r in rows} == {"training"}
    reasons = [r["reason"] for r in rows]
    assert "truncated" in reasons[0] and "No such file" in reasons[1] and "no PixelData" in reasons[2]
    assert all(p in r for p, r in zip(paths, reasons))  # each reason names its file
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=db)
    run = client.search_runs([client.get_experiment_by_name("copy").experiment_id])[0]
    assert run.data.metrics["set_aside_training"] == 3 and run.data.metrics["set_aside_validation"] == 0
    assert "set_aside.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.parametrize("bundle", ["clavicle_fracture", "covid_severity"])
def test_inference_when_no_file_can_be_read(tmp_path, bundle):
    """A folder where nothing can be scored still answers: predictions with every file's error, skipped.csv."""
    from monai.bundle import ConfigParser

    from tests.bundles.conftest import run_bundle

    root = os.path.join(BUNDLES, bundle)
    parser = ConfigParser()
    parser.read_config([os.path.join(root, "configs", n) for n in ("train.yaml", "cpu.yaml")])
    parser.update({"bundle_root": root, **_tiny(bundle)})
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    shutil.copy(os.path.join(SAMPLES, "covid", "covid_000.dcm"), folder / "IM0001")  # no mask, no segmenter
    gsps = next(f for f in sorted(os.listdir(os.path.join(SAMPLES, "clavicle"))) if f.endswith("_gsps.dcm"))
    shutil.copy(os.path.join(SAMPLES, "clavicle", gsps), folder / "PS0001")
    extra = {"ensemble_last": 0, "seg_checkpoint": str(tmp_path / "none.pt")} if bundle == "covid_severity" else {}
    if bundle == "clavicle_fracture":
        (folder / "IM0001").unlink()
        (folder / "IM0002").write_bytes(open(os.path.join(SAMPLES, "clavicle", gsps), "rb").read()[:300])
    run_bundle(bundle, ["train.yaml", "cpu.yaml", "inference.yaml"], tmp_path, tiny=_tiny(bundle), workflow_type="infer",
               input_dir=str(folder), model_path=str(tmp_path / "model.pt"), **extra)
    out = tmp_path / "out" / "inference"
    rows = list(csv.DictReader(open(out / ("severity.csv" if bundle == "covid_severity" else "predictions.csv"))))
    skipped = {r["file"]: r["reason"] for r in csv.DictReader(open(out / "skipped.csv"))}
    assert "presentation state" in skipped["PS0001"]
    errors = {r["file"]: r["error"] for r in rows}
    assert all(errors.values()) and set(errors) | set(skipped) == {p.name for p in folder.iterdir()}


def test_gpu_setting_is_channels_last_resnet50_with_amp(tmp_path):
    """gpu.yaml, parsed on this CPU box: ResNet-50 at 448 px with AMP; the network's convolutions and the prepared
    batches are in channels_last layout (what the comparison's GPU setting runs)."""
    from monai.bundle import ConfigParser

    from cutremain_monai.engines.bundle import bundle_configs

    root = os.path.join(BUNDLES, "clavicle_fracture")
    parser = ConfigParser()
    parser.read_config(bundle_configs(root, ["train.yaml", "gpu.yaml"]))
    parser.update({"bundle_root": root, "device": "$torch.device('cpu')", "output_dir": str(tmp_path)})
    assert parser["amp"] is True and parser["image_size"] == [448, 448] and parser["network_depth"] == 50
    net = parser.get_parsed_content("network")
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    prep = parser.get_parsed_content("validate#prepare_batch")
    x, _ = prep({"image": torch.rand(2, 3, 32, 32), "label": torch.tensor([0, 1])})  # (1 channel: both layouts agree)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@pytest.mark.parametrize("bundle", ALL)
def test_multi_node_device_is_the_local_rank(bundle, monkeypatch):
    """On node 2 of a torchrun job, rank 11 with LOCAL_RANK 3 trains on cuda:3 (the global rank is no device index)."""
    from monai.bundle import ConfigParser

    root = os.path.join(BUNDLES, bundle)
    parser = ConfigParser()
    parser.read_config([os.path.join(root, "configs", n) for n in ("train.yaml", "multi_gpu_train.yaml")])
    parser.update({"bundle_root": root})
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parser.get_parsed_content("device") == torch.device("cuda", 3)
