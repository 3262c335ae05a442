"""Inference over an archive: rows written batch by batch, a killed run resumed without scoring an image twice,
a bad file answered by a row with its error in the middle of a batch, and memory that does not grow with the
number of files (issue 27)."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from cutremain_monai.data.scale_data import generate_scale_set
from cutremain_monai.handlers import ClassificationPredictions
from tests.bundles.conftest import BUNDLES, TINY, run_bundle
from tests.conftest import ROOT


def _saved_network(tmp_path, bundle: str, tiny: dict) -> str:
    """The bundle's untrained network (seeded) as a bare state dict: what inference loads as its model."""
    from monai.bundle import ConfigParser

    root = os.path.join(BUNDLES, bundle)
    parser = ConfigParser()
    parser.read_config([os.path.join(root, "configs", n) for n in ("train.yaml", "cpu.yaml")])
    parser.update({"bundle_root": root, **tiny})
    torch.manual_seed(0)
    path = str(tmp_path / "model.pt")
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def _kill_after(monkeypatch, owner, name: str, batches: int) -> None:
    """``owner.name`` (the per-batch write of the rows) raises KeyboardInterrupt after ``batches`` calls."""
    write = getattr(owner, name)
    calls = {"n": 0}

    def write_then_die(self, *args):
        write(self, *args)
        calls["n"] += 1
        if calls["n"] == batches:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(owner, name, write_then_die)


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_killed_inference_resumes_without_scoring_twice(tmp_path, monkeypatch):
    generate_scale_set(str(tmp_path / "archive"), 22, size=96, fmt="dicom", seed=2)
    folder = tmp_path / "archive" / "images"
    (folder / "img_000005.dcm").write_bytes(open(folder / "img_000004.dcm", "rb").read()[:2000])  # truncated pixels
    model = _saved_network(tmp_path, "clavicle_fracture", TINY)
    settings = dict(tiny={**TINY, "batch_size": 4}, workflow_type="infer", input_dir=str(folder), model_path=model,
                    inference_cam=False)
    _kill_after(monkeypatch, ClassificationPredictions, "_flush", 3)  # dies after three batches were written
    with pytest.raises(KeyboardInterrupt):
        run_bundle("clavicle_fracture", ["train.yaml", "cpu.yaml", "inference.yaml"], tmp_path, **settings)
    out = tmp_path / "out" / "inference"
    first = _rows(out / "predictions.partial.csv")
    assert len(first) == 12 and not (out / "predictions.csv").exists()  # three batches of four, on disk
    assert next(r["error"] for r in first if r["file"] == "img_000005.dcm")  # the bad file: a row with its reason

    monkeypatch.undo()  # the resumed run is not killed
    wf, _ = run_bundle("clavicle_fracture", ["train.yaml", "cpu.yaml", "inference.yaml"], tmp_path, **settings)
    assert len(wf.parser.get_parsed_content("dataset")) == 22 - 12  # only the rest was scored
    rows = _rows(out / "predictions.csv")
    names = [r["file"] for r in rows]
    assert sorted(names) == sorted(p.name for p in folder.iterdir()) and len(set(names)) == 22  # none twice
    assert {r["file"]: r["probability"] for r in rows if r["file"] in {x["file"] for x in first}} == \
        {r["file"]: r["probability"] for r in first}  # the first run's rows kept as they were
    aside = _rows(out / "set_aside.csv")
    assert [r["file"] for r in aside] == ["img_000005.dcm"] and aside[0]["section"] == "inference"

    # another model: the earlier rows are not reused
    os.utime(model, ns=(os.stat(model).st_atime_ns, os.stat(model).st_mtime_ns + 10**9))
    wf, _ = run_bundle("clavicle_fracture", ["train.yaml", "cpu.yaml", "inference.yaml"], tmp_path, **settings)
    assert len(wf.parser.get_parsed_content("dataset")) == 22 and (out / "predictions.partial.csv.stale").exists()
    # the same model with another validation threshold (the rows' predictions would mix two): scored again
    wf, _ = run_bundle("clavicle_fracture", ["train.yaml", "cpu.yaml", "inference.yaml"], tmp_path, **settings)
    assert len(wf.parser.get_parsed_content("dataset")) == 0  # finished: nothing left
    (tmp_path / "out" / "threshold.json").write_text(json.dumps({"threshold": 0.25}))
    wf, _ = run_bundle("clavicle_fracture", ["train.yaml", "cpu.yaml", "inference.yaml"], tmp_path, **settings)
    assert len(wf.parser.get_parsed_content("dataset")) == 22
    scored = [r for r in _rows(out / "predictions.csv") if not r["error"]]
    assert len(scored) == 21 and all(r["prediction"] == str(int(float(r["probability"]) >= 0.25)) for r in scored)


_RSS = """
import json, resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(proc.stderr[-3000:], file=sys.stderr)
print(json.dumps({"rc": proc.returncode, "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def test_inference_memory_does_not_grow_with_the_archive(tmp_path):
    """Peak RSS of `monai.bundle run` inference over 30 and over 240 DICOM files of 512 px (two loader workers):
    the same within 40 MB."""
    generate_scale_set(str(tmp_path / "archive"), 240, size=512, fmt="dicom", seed=4)
    model = _saved_network(tmp_path, "clavicle_fracture", TINY)
    peaks = {}
    for n in (30, 240):
        folder = tmp_path / f"in_{n}"
        folder.mkdir()
        for name in sorted(os.listdir(tmp_path / "archive" / "images"))[:n]:
            os.link(tmp_path / "archive" / "images" / name, folder / name)
        bundle = os.path.join(BUNDLES, "clavicle_fracture")
        settings = {**TINY, "num_workers": 2, "batch_size": 8, "input_dir": str(folder), "model_path": model,
                    "output_dir": str(tmp_path / f"out_{n}"), "inference_cam": False, "datalist_task": None}
        args = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
                "['configs/train.yaml','configs/cpu.yaml','configs/inference.yaml']"]
        for k, v in settings.items():
            args += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
        r = subprocess.run([sys.executable, "-c", _RSS, *args], capture_output=True, text=True, cwd=bundle,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}, timeout=600)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res["rc"] == 0, r.stderr[-3000:]
        assert len(_rows(tmp_path / f"out_{n}" / "inference" / "predictions.csv")) == n
        peaks[n] = res["peak_kib"] / 1024
    assert peaks[240] - peaks[30] < 40, peaks
    shutil.rmtree(tmp_path / "archive")


def test_killed_covid_severity_inference_resumes(tmp_path, monkeypatch, capsys):
    """covid_severity: ten radiographs with their lung-mask files, one truncated, batches of four; killed after two
    batches, resumed: every image once in severity.csv, the first rows as written, the truncated file a row with its
    error and in set_aside.csv; another checkpoint scores everything again."""
    from cutremain_monai.handlers import SeverityPredictions
    from tests.bundles.conftest import COVID_TINY
    from tests.conftest import SAMPLES

    folder = tmp_path / "export"
    folder.mkdir()
    for i in range(10):
        for suffix in (".dcm", "_lungs.png"):
            shutil.copy(os.path.join(SAMPLES, "covid", f"covid_{i:03d}{suffix}"), folder / f"covid_{i:03d}{suffix}")
    data = (folder / "covid_005.dcm").read_bytes()
    (folder / "covid_005.dcm").write_bytes(data[: len(data) // 2])  # header intact, pixel data cut short
    model = _saved_network(tmp_path, "covid_severity", COVID_TINY)
    settings = dict(tiny=COVID_TINY, workflow_type="infer", input_dir=str(folder), mask_dir=str(folder),
                    mask_suffix="_lungs", model_path=model, ensemble_last=0, inference_overlays=False,
                    seg_checkpoint=str(tmp_path / "no_segmenter.pt"))
    configs = ["train.yaml", "cpu.yaml", "inference.yaml"]
    _kill_after(monkeypatch, SeverityPredictions, "_flush", 2)
    with pytest.raises(KeyboardInterrupt):
        run_bundle("covid_severity", configs, tmp_path, **settings)
    out = tmp_path / "out" / "inference"
    first = _rows(out / "severity.partial.csv")
    assert len(first) == 8 and not (out / "severity.csv").exists()  # two batches of four, on disk
    assert "covid_005.dcm" in {r["file"] for r in first if r["error"]}

    monkeypatch.undo()
    wf, _ = run_bundle("covid_severity", configs, tmp_path, **settings)
    assert len(wf.parser.get_parsed_content("dataset")) == 2  # only the rest was scored
    rows = _rows(out / "severity.csv")
    names = [r["file"] for r in rows]
    assert sorted(names) == [f"covid_{i:03d}.dcm" for i in range(10)]  # every image once
    assert {r["file"]: r["p_A"] for r in rows if r["file"] in {x["file"] for x in first}} == \
        {r["file"]: r["p_A"] for r in first}
    assert all(r["mask_source"] == "file" and r["global_score"] for r in rows if not r["error"])
    aside = _rows(out / "set_aside.csv")
    assert [r["file"] for r in aside] == ["covid_005.dcm"] and aside[0]["section"] == "inference"

    os.utime(model, ns=(os.stat(model).st_atime_ns, os.stat(model).st_mtime_ns + 10**9))  # another checkpoint
    wf, _ = run_bundle("covid_severity", configs, tmp_path, **settings)
    assert len(wf.parser.get_parsed_content("dataset")) == 10 and (out / "severity.partial.csv.stale").exists()
    assert len(_rows(out / "severity.csv")) == 10

    # `cutremain infer` names the table this bundle writes (severity.csv), not predictions.csv
    from cutremain_monai.cli import main as cli_main

    overrides = {**COVID_TINY, **{k: v for k, v in settings.items() if k not in ("tiny", "workflow_type", "input_dir")},
                 "tracking_uri": str(tmp_path / "cli_mlruns.db")}
    capsys.readouterr()
    assert cli_main(["infer", "--bundle", os.path.join(BUNDLES, "covid_severity"), "--input", str(folder), "--output-dir",
                     str(tmp_path / "out"), "--configs", "train.yaml,cpu.yaml", "--overrides", json.dumps(overrides)]) == 0
    assert f"predictions: {out / 'severity.csv'}" in capsys.readouterr().out


@pytest.mark.parametrize("bundle, table", [("lesion_segmentation", "lesions"), ("background_learning", "targetness")])
def test_killed_mask_inference_resumes(tmp_path, monkeypatch, bundle, table):
    """lesion_segmentation / background_learning: 14 DICOMs, one truncated, batches of four; killed after two
    batches, resumed: every image in the table once, masks / maps of the read images only, the truncated file a
    row with its error and in set_aside.csv."""
    from cutremain_monai.handlers.predictions import RowTable
    from tests.bundles.conftest import BG_TINY, LS_TINY

    tiny = LS_TINY if bundle == "lesion_segmentation" else BG_TINY
    generate_scale_set(str(tmp_path / "archive"), 14, size=96, fmt="dicom", seed=3)
    folder = tmp_path / "archive" / "images"
    data = (folder / "img_000005.dcm").read_bytes()
    (folder / "img_000005.dcm").write_bytes(data[:2000])  # header intact, pixel data cut short
    model = _saved_network(tmp_path, bundle, tiny)
    settings = dict(tiny=tiny, workflow_type="infer", input_dir=str(folder), model_path=model)
    if bundle == "lesion_segmentation":
        settings.update(dicom_seg=False, min_score=0.0)
    configs = ["train.yaml", "cpu.yaml", "inference.yaml"]
    _kill_after(monkeypatch, RowTable, "add", 2)
    with pytest.raises(KeyboardInterrupt):
        run_bundle(bundle, configs, tmp_path, **settings)
    out = tmp_path / "out" / "inference"
    first = _rows(out / f"{table}.partial.csv")
    assert len({r["file"] for r in first}) == 8 and not (out / f"{table}.csv").exists()
    assert next(r["error"] for r in first if r["file"] == "img_000005.dcm")

    monkeypatch.undo()
    wf, _ = run_bundle(bundle, configs, tmp_path, **settings)
    assert len(wf.parser.get_parsed_content("dataset")) == 14 - 8
    rows = _rows(out / f"{table}.csv")
    assert sorted(r["file"] for r in rows) == sorted(p.name for p in folder.iterdir())  # every image once
    kind = "masks" if bundle == "lesion_segmentation" else "maps"
    assert sorted(os.listdir(out / kind)) == sorted(p.name + (".png" if kind == "masks" else ".npy")
                                                    for p in folder.iterdir() if p.name != "img_000005.dcm")
    aside = _rows(out / "set_aside.csv")
    assert [r["file"] for r in aside] == ["img_000005.dcm"] and aside[0]["section"] == "inference"
