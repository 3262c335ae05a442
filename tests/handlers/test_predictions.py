"""Per-image prediction tables (cutremain_monai/handlers/predictions.py): RowTable streamed to a partial file or held
in memory, and SeverityPredictions writing its rows batch by batch with placeholders of unreadable files."""

import csv

import pytest
import torch
from ignite.engine import Engine, Events

from cutremain_monai.data.set_aside import SET_ASIDE_KEY
from cutremain_monai.handlers import SeverityPredictions
from cutremain_monai.handlers.predictions import RowTable


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("partial", [True, False])
def test_row_table_writes_every_row_and_the_set_aside_report(tmp_path, partial):
    partial_file = str(tmp_path / "t.partial.csv") if partial else None
    table = RowTable(str(tmp_path / "t.csv"), ["file", "score", "error"], partial_file, str(tmp_path / "aside.csv"))
    table.add([{"file": "a", "score": 0.5, "error": ""}, {"file": "b", "error": "DicomReadError: truncated"}])
    if partial:  # on disk as soon as the batch is scored
        assert [r["file"] for r in _rows(partial_file)] == ["a", "b"]
    table.add([{"file": "c", "score": 0.25, "error": ""}])
    rows = table.finish([{"file": "d", "error": "set aside by the dataset"}])
    assert [r["file"] for r in rows] == ["a", "b", "c", "d"]
    assert [(r["file"], r["score"]) for r in _rows(tmp_path / "t.csv")] == [("a", "0.5"), ("b", ""), ("c", "0.25"),
                                                                           ("d", "")]
    assert [(r["section"], r["file"]) for r in _rows(tmp_path / "aside.csv")] == [("inference", "b"), ("inference", "d")]


def test_row_table_scored_key_keeps_errors_of_scored_rows_out_of_the_report(tmp_path):
    table = RowTable(str(tmp_path / "t.csv"), ["file", "lesion_score", "error"], str(tmp_path / "p.csv"),
                     str(tmp_path / "aside.csv"), scored_key="lesion_score")
    table.add([{"file": "a", "lesion_score": 0.9, "error": "DICOM Segmentation not written: no pixels"},
               {"file": "b", "error": "OSError: truncated"}])
    table.finish()
    assert [r["file"] for r in _rows(tmp_path / "aside.csv")] == ["b"]
    assert [r["file"] for r in _rows(tmp_path / "t.csv")] == ["a", "b"]


def _severity_engine(batches):
    def step(engine, batch):
        engine.state.batch = batch
        return [{"pred": torch.full((6,), 0.25 * (i + 1))} for i in range(len(batch))]

    return Engine(step)


def test_severity_rows_streamed_per_batch_with_placeholders(tmp_path):
    partial = tmp_path / "severity.partial.csv"
    writer = SeverityPredictions(str(tmp_path), overlays=False, partial_file=str(partial),
                                 set_aside_report=str(tmp_path / "set_aside.csv"))
    batches = [[{"image_id": "a.dcm", "mask_source": "file", SET_ASIDE_KEY: ""},
                {"image_id": "b.dcm", SET_ASIDE_KEY: "DicomReadError: b.dcm: truncated"}],
               [{"image_id": "c.dcm", "mask_source": "segmented", SET_ASIDE_KEY: ""}]]
    engine = _severity_engine(batches)
    writer.attach(engine)
    written = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: written.append(len(_rows(partial))))
    engine.run(batches, max_epochs=1)
    assert written == [2, 3]  # each batch's rows on disk when it is scored
    assert set(writer._seen) == {"c.dcm"}  # only the current batch is held (DicomResults takes its rows from it)
    rows = {r["file"]: r for r in _rows(tmp_path / "severity.csv")}
    assert set(rows) == {"a.dcm", "b.dcm", "c.dcm"}
    assert rows["b.dcm"]["error"].startswith("DicomReadError") and rows["b.dcm"]["p_A"] == ""
    assert float(rows["c.dcm"]["global_score"]) == pytest.approx(6 * 0.25) and rows["c.dcm"]["mask_source"] == "segmented"
    assert [r["file"] for r in _rows(tmp_path / "set_aside.csv")] == ["b.dcm"]


def test_severity_rows_in_memory_without_partial_file(tmp_path):
    writer = SeverityPredictions(str(tmp_path), filename="test_severity.csv", overlays=False,
                                 set_aside=[{"file": "x.dcm", "reason": "unreadable"}])
    batches = [[{"image_id": "a.dcm"}, {"image_id": "b.dcm"}]]
    engine = _severity_engine(batches)
    writer.attach(engine)
    engine.run(batches, max_epochs=1)
    assert [r["file"] for r in _rows(tmp_path / "test_severity.csv")] == ["a.dcm", "b.dcm", "x.dcm"]
    assert not (tmp_path / "set_aside.csv").exists()
