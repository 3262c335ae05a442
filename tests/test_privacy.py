"""No patient identifier in anything a whole run writes.

An export tree named after its patients (``<FAMILY>^<GIVEN> <PatientID>/<birth date>/IM00001``, as some PACS
export it) with the same values in the headers, plus damaged files and text notes named after the patient; then
``cutremain ingest``, one short clavicle training run with MLflow (sqlite store, artifacts, model registry),
``evaluate`` and folder inference over the export itself. A byte search of every file written (the datalist, the
reports, the link folder's names, checkpoints, overlays, predictions, the MLflow database and artifact store) and
of the logs finds none of the names, IDs or birth dates, in any of the forms they took in the paths.
"""

import csv
import json
import logging
import os

import pytest

from cutremain_monai.cli import main as cli_main
from tests.bundles.conftest import run_bundle
from tests.conftest import SAMPLES, mlflow_db

CPU = ["train.yaml", "cpu.yaml"]


def _forms(patient: dict) -> list[str]:
    family, given = patient["name"].split("^")
    b = patient["birth_date"]
    return [patient["name"], family, given, patient["name"].replace("^", " "), patient["id"], b,
            f"{b[:4]}-{b[4:6]}-{b[6:]}"]


def _hits(folder: str, values: list[str]) -> list[tuple[str, str]]:
    needles = [(v, v.lower().encode()) for v in values]
    found = []
    for d, dirs, files in os.walk(folder):
        for name in dirs + files:
            found += [(os.path.join(d, name), v) for v, n in needles if n in name.lower().encode()]
        for name in files:
            path = os.path.join(d, name)
            if os.path.islink(path):  # the link folder: its links point into the export (that is their job)
                continue
            data = open(path, "rb").read().lower()
            found += [(path, v) for v, n in needles if n in data]
    return found


@pytest.mark.slow
def test_whole_run_writes_no_identifier(tmp_path, capfd):
    from cutremain_monai.data.phantoms import generate_export_tree

    with open(os.path.join(SAMPLES, "datalist.json")) as f:
        samples = json.load(f)["clavicle"]["training"]
    pos = [it for it in samples if it["label"] == 1][:8]
    neg = [it for it in samples if it["label"] == 0][:8]
    sources = [it for pair in zip(pos, neg) for it in pair]  # every patient: one fractured image, one normal
    export = tmp_path / "export"
    tree = generate_export_tree(str(export), 16, images_per_patient=2, damaged=0.125, not_dicom=0.125,
                                sources=[os.path.join(SAMPLES, it["image"]) for it in sources])
    values = [v for p in tree["patients"] for v in _forms(p)]
    assert _hits(str(export), values)  # the search finds them where they are
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    with open(inputs / "boxes.csv", "w", newline="") as f:  # the radiologists' boxes (the user's own file)
        w = csv.writer(f)
        w.writerow(["path", "label", "x0", "y0", "x1", "y1", "box_label"])
        for path, it in zip(tree["images"], sources):
            for b, lab in zip(it["boxes"], it["box_labels"]):
                w.writerow([os.path.relpath(path, inputs), it["label"], *b, lab])

    work = tmp_path / "work"
    log = logging.FileHandler(tmp_path / "run.log")  # what a user's console shows, kept to be searched
    log.setLevel(logging.INFO)
    logging.getLogger().addHandler(log)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        assert cli_main(["ingest", str(export), "--boxes", str(inputs / "boxes.csv"), "-o", str(work / "dl.json"),
                         "--split", "0.5,0.25,0.25", "--no-progress"]) == 0
        data = json.load(open(work / "dl.json"))
        assert data["ingest"]["path_mode"] == "uid" and data["ingest"]["quarantined"] == 4
        assert sum(len(data[s]) for s in ("training", "validation", "test")) == 16
        overrides = {"datalist": str(work / "dl.json"), "tracking_uri": mlflow_db(work),
                     "experiment_name": "privacy", "cam_images": 4}
        run_bundle("clavicle_fracture", CPU, work, register_model=True, **overrides)
        run_bundle("clavicle_fracture", CPU + ["evaluate.yaml"], work, **overrides)
        run_bundle("clavicle_fracture", CPU + ["inference.yaml"], work, input_dir=str(export), **overrides)
    finally:
        logging.getLogger().removeHandler(log)
        logging.getLogger().setLevel(level)
        log.close()
    out = work / "out"
    rows = list(csv.DictReader(open(out / "inference" / "predictions.csv")))
    scored = [r for r in rows if not r.get("error")]
    assert len(scored) == 16 and len(rows) == 18  # every image scored (and the 2 damaged copies listed)
    assert len(list(csv.DictReader(open(out / "test_predictions.csv")))) == 4
    assert list((out / "cam_overlays").glob("*.png")) and list((out / "inference" / "cam").glob("*.png"))
    skipped = list(csv.DictReader(open(out / "inference" / "skipped.csv")))
    assert len(skipped) == 2 and all(r["file"].startswith("f") for r in skipped)  # the notes, by token
    set_aside = list(csv.DictReader(open(out / "inference" / "set_aside.csv")))
    assert len(set_aside) == 2 and all("truncated" in r["reason"] for r in set_aside)  # the damaged copies
    mlflow_files = [os.path.join(d, f) for d, _, fs in os.walk(work) for f in fs if "mlruns" in d or f == "mlruns.db"]
    assert len(mlflow_files) > 3  # the store and its artifacts are part of the search
    captured = capfd.readouterr()
    with open(tmp_path / "console.txt", "w") as f:
        f.write(captured.out + captured.err)
    hits = _hits(str(work), values)
    hits += [(p, v) for p in (tmp_path / "run.log", tmp_path / "console.txt")
             for v in values if v.lower() in open(p).read().lower()]
    assert os.path.getsize(tmp_path / "run.log") > 0
    assert not hits, hits[:10]
