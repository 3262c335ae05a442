"""The pieces of DicomResults checked by hand: maps back onto the source image, the box of a map, findings per
label mode."""

import os

import numpy as np
import pytest

from cutremain_monai.handlers.dicom_results import DicomResults, map_box, to_source_frame


def test_to_source_frame_halves_and_whole():
    cam = np.zeros((4, 4), np.float32)
    cam[:, 2:] = 1.0  # the right half of the network input is hot
    whole, lo = to_source_frame(cam, (8, 10), None)
    assert lo == 0 and whole.shape == (8, 10) and whole[:, 6:].min() > 0.99 and whole[:, :4].max() < 0.01
    right, lo = to_source_frame(cam, (8, 11), "right")  # right half of an 11-wide image: columns 5..10
    assert lo == 5 and right.shape == (8, 6)
    left, lo = to_source_frame(cam, (8, 11), "left")
    assert lo == 0 and left.shape == (8, 5)


def test_map_box_is_the_largest_region():
    cam = np.zeros((10, 12))
    cam[1:3, 1:3] = 0.9  # small
    cam[5:9, 4:11] = 0.8  # large
    assert map_box(cam, 0.5) == [4.0, 5.0, 11.0, 9.0]
    assert map_box(cam, 0.95) is None


@pytest.mark.parametrize("mode, row, boxed", [
    ("binary", {"probability": 0.8, "prediction": 1}, {"fracture": True}),
    ("binary", {"probability": 0.3, "prediction": 0}, {"fracture": False}),
    ("multiclass", {"p_normal": 0.1, "p_A": 0.7, "p_B": 0.2, "prediction": "A"}, {"A": True, "B": False}),
    ("multilabel", {"p_normal": 0.1, "p_A": 0.7, "p_B": 0.6, "prediction": "A|B"}, {"normal": False, "A": True,
                                                                                    "B": True}),
])
def test_findings_per_label_mode(mode, row, boxed):
    names = ["normal", "fracture"] if mode == "binary" else ["normal", "A", "B"]
    handler = DicomResults("/tmp/x", predictions=None, label_mode=mode, class_names=names, enabled=False)
    hot = np.zeros((20, 20), np.float32)
    hot[5:10, 5:15] = 1.0
    full = {c: hot for c in range(len(names))}
    got = {f.name: f for f in handler._findings(row, full, 0.5)}
    assert {n: f.box is not None for n, f in got.items()} == boxed
    for name, f in got.items():
        expected = row["probability"] if mode == "binary" else row[f"p_{name}"]
        assert f.probability == pytest.approx(expected)
        if f.box is not None:
            assert f.box == [5.0, 5.0, 15.0, 10.0]


def _severity_run(tmp_path, sources, **kwargs):
    """DicomResults over ``sources`` (severity rows and an overlay PNG each), without a network: its files."""
    import csv

    from PIL import Image

    from cutremain_monai.constants import BRIXIA_ZONES

    class Rows:
        output_dir = str(tmp_path)
        rows = [{"file": f"im{i}", "overlay": "overlay.png", "global_score": "3.0",
                 **{f"p_{z}": "0.4" for z in BRIXIA_ZONES}, **{f"zone_{z}": "1" for z in BRIXIA_ZONES}}
                for i in range(len(sources))]

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "overlay.png")
    out = tmp_path / kwargs.pop("out", "dicom")
    handler = DicomResults(str(out), Rows(), label_mode="severity", bundle="covid_severity", version="1.2.0",
                           **kwargs)
    handler._maps = {f"im{i}": {"source": str(p), "halves": {}} for i, p in enumerate(sources)}
    handler(None)
    return {(m["file"], m["object"]): str(out / m["path"]) for m in csv.DictReader(open(out / "manifest.csv"))}


def test_one_series_per_study_kind_and_run(tmp_path):
    """Results are filed as a PACS files them: a series per study, kind and run, described by the model and its
    version, numbered inside the series; the SR references its image's overlay; the same run again gives the
    same instances, a new run id new series."""
    import glob
    import os

    import pydicom

    from tests.conftest import SAMPLES, dciodvfy_errors

    sources = []
    for i, p in enumerate(sorted(glob.glob(os.path.join(SAMPLES, "covid", "covid_00[0-2].dcm")))):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["study", str(i // 2)])  # studies of 2 and 1
        sources.append(tmp_path / f"src{i}.dcm")
        ds.save_as(sources[-1])
    files = _severity_run(tmp_path, sources)
    objs = {k: pydicom.dcmread(v) for k, v in files.items()}
    assert set(objs) == {(f"im{i}", k) for i in range(3) for k in ("SR", "SC")}
    series = {(f, k): (str(o.StudyInstanceUID), str(o.SeriesInstanceUID)) for (f, k), o in objs.items()}
    assert series["im0", "SR"] == series["im1", "SR"] != series["im2", "SR"]  # one series per study
    assert series["im0", "SC"][1] not in {series["im0", "SR"][1], series["im2", "SC"][1]}  # and per kind
    assert sorted(int(objs[f"im{i}", "SR"].InstanceNumber) for i in (0, 1)) == [1, 2]
    assert objs["im0", "SR"].SeriesDescription == "covid_severity 1.2.0 findings"
    assert objs["im0", "SC"].SeriesDescription == "covid_severity 1.2.0 overlay"
    assert int(objs["im0", "SR"].SeriesNumber) == 901 and int(objs["im0", "SC"].SeriesNumber) == 902
    (study,) = objs["im0", "SR"].PertinentOtherEvidenceSequence
    (ref_series,) = study.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == objs["im0", "SC"].SeriesInstanceUID
    assert ref_series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == objs["im0", "SC"].SOPInstanceUID
    assert dciodvfy_errors(files["im0", "SR"]) == []
    again = _severity_run(tmp_path, sources, out="again")
    assert {k: pydicom.dcmread(v).SOPInstanceUID for k, v in again.items()} == {
        k: o.SOPInstanceUID for k, o in objs.items()}  # the same run: the same instances (a resend is no duplicate)
    fresh = _severity_run(tmp_path, sources, out="fresh", run_id="2")
    assert not {pydicom.dcmread(v).SeriesInstanceUID for v in fresh.values()} & {s for _, s in series.values()}
    grown = _severity_run(tmp_path, sources[:1], out="grown")  # another set of images of the study: another run
    assert pydicom.dcmread(grown["im0", "SR"]).SeriesInstanceUID != series["im0", "SR"][1]


class _TinyNet:
    """A classifier with a ``layer3`` for Grad-CAM (one logit)."""

    @staticmethod
    def make():
        import torch

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layer3 = torch.nn.Conv2d(1, 4, 3, padding=1)
                self.head = torch.nn.Linear(4, 1)

            def forward(self, x):
                return self.head(self.layer3(x).relu().mean((2, 3)))

        torch.manual_seed(0)
        return Tiny()


def _classification_run(tmp_path, sources, batch_images=2, earlier_rows=()):
    """An evaluator-like run over ``sources`` (two halves per image, an image's halves in one batch) through
    ClassificationPredictions (rows appended per batch, threshold 0: every image positive) and DicomResults: the
    handler, and the number of images it held after each iteration."""
    import csv
    import types

    import torch
    from ignite.engine import Engine, Events

    from cutremain_monai.handlers import ClassificationPredictions

    net = _TinyNet.make()
    items = [{"image": str(p), "image_id": os.path.basename(str(p))} for p in sources]
    partial = tmp_path / "inference" / "predictions.partial.csv"
    if earlier_rows:  # a resumed run: the rows of an earlier one are there already
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file", "probability", "prediction", "left", "right", "error"])
            w.writeheader()
            w.writerows(earlier_rows)
    preds = ClassificationPredictions(str(tmp_path / "inference"), threshold=0.0, partial_file=str(partial))
    handler = DicomResults(str(tmp_path / "dicom"), preds, network=net, bundle="clavicle_fracture", version="0.3.0")
    batches = []
    for i in range(0, len(items), batch_images):
        batches.append([{"image": torch.rand(1, 16, 16), "image_path": it["image"], "image_id": it["image_id"],
                         "half": half} for it in items[i : i + batch_images] for half in ("left", "right")])

    def step(engine, batch):
        with torch.no_grad():
            return [{"pred": torch.sigmoid(net(b["image"][None]))[0]} for b in batch]

    engine = Engine(step)
    preds.attach(engine)
    handler.attach(engine)
    engine.data_loader = types.SimpleNamespace(dataset=types.SimpleNamespace(data=items))  # (MONAI's evaluator has it)
    held: list[int] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: held.append(len(handler._maps)))
    engine.run(batches, max_epochs=1)
    return handler, held


def test_memory_does_not_grow_with_the_images_and_only_this_run_is_written(tmp_path):
    """Each image's objects are written in the iteration that scored it: no Grad-CAM map is held after any
    iteration, however many images; the series are planned at the start (one per study and kind across batches);
    a resumed run writes objects for its own images only, not for the rows of the earlier run."""
    import csv
    import glob
    import shutil

    import pydicom

    from tests.conftest import SAMPLES

    sources = []
    for i, p in enumerate(sorted(glob.glob(os.path.join(SAMPLES, "clavicle", "clavicle_00[0-5].dcm")))):
        sources.append(tmp_path / "src" / f"im{i}.dcm")
        sources[-1].parent.mkdir(exist_ok=True)
        shutil.copy(p, sources[-1])
        ds = pydicom.dcmread(sources[-1])
        ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["study", str(i % 2)])  # two studies of 3
        ds.save_as(sources[-1])
    handler, held = _classification_run(tmp_path, sources, earlier_rows=[
        {"file": "earlier.dcm", "probability": 0.9, "prediction": 1, "error": ""}])
    assert held == [0, 0, 0]  # three batches of two images: nothing kept between iterations
    manifest = list(csv.DictReader(open(tmp_path / "dicom" / "manifest.csv")))
    assert {m["file"] for m in manifest} == {f"im{i}.dcm" for i in range(6)}  # not earlier.dcm
    assert all(not m["error"] for m in manifest) and {m["object"] for m in manifest} == {"SR", "SC", "PR"}
    srs = {m["file"]: pydicom.dcmread(tmp_path / "dicom" / m["path"]) for m in manifest if m["object"] == "SR"}
    series = {}
    for name, sr in srs.items():
        series.setdefault(str(sr.StudyInstanceUID), set()).add(str(sr.SeriesInstanceUID))
    assert len(series) == 2 and all(len(s) == 1 for s in series.values())  # one SR series per study, across batches
    numbers = sorted(int(sr.InstanceNumber) for sr in srs.values() if sr.StudyInstanceUID == srs["im0.dcm"].StudyInstanceUID)
    assert numbers == [1, 2, 3]
