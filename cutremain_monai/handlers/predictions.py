"""Evaluator handlers that write per-image predictions: ``ClassificationPredictions`` (the classification bundles)
and ``SeverityPredictions`` (covid_severity), used by ``evaluate.yaml`` (test section) and ``inference.yaml``
(a folder), so both write the same rows from the same pipeline.

MONAI's ``ClassificationSaver`` writes one row per network input; these add what a reader of the results needs:
samples of one image (the two halves of ``SplitHalvesd``) joined into one row (image probability = the maximum over
the halves: a fracture on either side makes the image positive), the validation-chosen threshold applied, the
class names as columns, files set aside by the dataset listed with their reason (nothing silently dropped),
Grad-CAM / lesion-map overlays, and rank-0-only writing.

:class:`RowTable` is the per-image CSV under all of them (and under the lesion-mask and targetness writers): rows
appended to a partial file as each batch is scored, so an archive's results are on disk as they come, memory holds
one batch, and a killed run resumes where it stopped (:func:`cutremain_monai.data.folder.unscored`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events

from cutremain_monai.constants import BRIXIA_ZONES
from cutremain_monai.data.set_aside import SET_ASIDE_KEY, write_set_aside
from cutremain_monai.handlers.utils import rank
from cutremain_monai.localization.cam import save_overlay
from cutremain_monai.localization.grad_cam import grad_cam
from cutremain_monai.localization.severity_overlay import save_severity_overlay

__all__ = ["ClassificationPredictions", "SeverityPredictions", "RowTable"]

logger = logging.getLogger(__name__)


def _samples(engine: Engine) -> list[tuple[dict, dict]]:
    """(batch item, output item) pairs of the current iteration (decollated engine state)."""
    batch, out = engine.state.batch, engine.state.output
    if not isinstance(batch, list) or not isinstance(out, list):
        raise TypeError("prediction rows need a decollated batch and output (the evaluator's decollate=True)")
    return list(zip(batch, out))


def _file_name(item: dict, id_key: str, path_key: str) -> str:
    value = item.get(id_key) or item.get(path_key)
    if value is None:
        raise KeyError(f"prediction rows need '{id_key}' or '{path_key}' in the samples (CopyItemsd the image path)")
    return str(value)


def _write(path: str, fields: Sequence[str], rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


class RowTable:
    """The per-image CSV of an evaluator run (``predictions.csv``, ``severity.csv``, ``lesions.csv``, ...).

    With ``partial_file``, :meth:`add` appends each batch's rows to it (rank 0): the results of an archive are on
    disk as they come, memory holds one batch, a killed run loses at most a batch, and
    :func:`cutremain_monai.data.folder.unscored` leaves the images already in it out of the next run.
    :meth:`finish` then writes ``path`` from every row of the partial file (those of earlier runs included) and the
    given error rows. Without ``partial_file`` the rows are kept in memory and written by :meth:`finish`.
    Rows of files set aside (an ``error``, and ``scored_key`` empty when given: ``lesions.csv`` also names a DICOM
    Segmentation that could not be written in the row of an image it scored) also go to ``set_aside_report``
    under ``section``.
    """

    def __init__(self, path: str, fields: Sequence[str], partial_file: str | None = None,
                 set_aside_report: str | None = None, section: str = "inference", scored_key: str | None = None):
        self.path, self.fields = path, list(fields)
        self.partial_file = partial_file
        self.set_aside_report, self.section, self.scored_key = set_aside_report, section, scored_key
        self._rows: list[dict] = []

    def reset(self) -> None:
        """A new run: no rows held (a partial file keeps its rows)."""
        self._rows = []

    def add(self, rows: Sequence[dict]) -> None:
        """Rows of images scored in this batch: appended to the partial file (rank 0), or held."""
        if not self.partial_file:
            self._rows.extend(rows)
            return
        if not rows or rank() != 0:
            return
        new = not os.path.exists(self.partial_file)
        os.makedirs(os.path.dirname(os.path.abspath(self.partial_file)), exist_ok=True)
        with open(self.partial_file, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, restval="", extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(rows)

    def scored(self) -> list[dict]:
        """Every row so far: the partial file's (as strings), or those held."""
        if not self.partial_file:
            return list(self._rows)
        if not os.path.exists(self.partial_file):
            return []
        with open(self.partial_file, newline="") as f:
            return list(csv.DictReader(f))

    def set_aside_rows(self, rows: Sequence[dict]) -> list[dict]:
        """``set_aside.csv`` rows of the files in ``rows`` that could not be scored."""
        return [{"section": self.section, "file": r["file"], "reason": r["error"]} for r in rows
                if r.get("error") and not (self.scored_key and str(r.get(self.scored_key, "")) != "")]

    def finish(self, error_rows: Sequence[dict] = ()) -> list[dict]:
        """Write ``path`` (and the set-aside report) from every row and ``error_rows``; returns the rows."""
        rows = self.scored() + list(error_rows)
        _write(self.path, self.fields, rows)
        write_set_aside(self.set_aside_report, self.section, self.set_aside_rows(rows))
        return rows


class _PredictionsBase:
    """Per-image rows made from each batch (``_take_rows``), put in a :class:`RowTable` (see there for
    ``partial_file``, ``set_aside_report``, ``section``); subclasses set what ``_fields`` uses before this
    ``__init__``."""

    def __init__(self, output_dir: str, filename: str, id_key: str, path_key: str, set_aside: Sequence[dict] | None,
                 enabled: bool, partial_file: str | None = None, set_aside_report: str | None = None,
                 section: str = "inference"):
        self.output_dir = output_dir
        self.filename = filename
        self.id_key, self.path_key = id_key, path_key
        self.set_aside = list(set_aside or [])
        self.enabled = enabled
        self.rows: list[dict] = []
        self.path = os.path.join(output_dir, filename)
        self.partial_file = partial_file
        self.set_aside_report, self.section = set_aside_report, section
        self.table = RowTable(self.path, self._fields(), partial_file, set_aside_report, section)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        loader = getattr(engine, "data_loader", None)
        if loader is not None and len(loader) == 0:  # MONAI does not start an engine on no data: write the rows now
            self._reset(engine)
            self(engine)

    def _fields(self) -> list[str]:
        raise NotImplementedError

    def _collect(self, engine: Engine) -> None:
        raise NotImplementedError

    def _take_rows(self) -> list[dict]:
        """The rows of the images complete so far and not yet taken."""
        raise NotImplementedError

    def _reset(self, engine: Engine) -> None:
        self._seen: dict = {}
        self.table.reset()

    def _flush(self) -> None:
        """Put the rows of the images complete in this batch in the table (appended to ``partial_file``)."""
        self.table.add(self._take_rows())

    def _error_rows(self) -> list[dict]:
        return [{"file": r["file"], "error": r["reason"]} for r in self.set_aside]

    def __call__(self, engine: Engine) -> None:
        if rank() != 0:
            return
        self._flush()
        self.rows = self.table.finish(self._error_rows())
        logger.info("wrote %d rows to %s (%d with an error)", len(self.rows), self.path,
                    sum(1 for r in self.rows if r.get("error")))


class ClassificationPredictions(_PredictionsBase):
    """Args:
        output_dir / filename: the CSV (``predictions.csv``, ``test_predictions.csv``).
        label_mode: ``binary`` (columns ``probability``, ``prediction`` at the validation threshold, ``left`` /
            ``right`` per half) | ``multiclass`` (``p_<class>`` of the half with the highest abnormal probability
            ``1 - p_<class 0>``, ``prediction`` its class, ``left`` / ``right`` the per-half classes) |
            ``multilabel`` (``p_<class>`` max over halves, ``prediction`` the classes at or above their thresholds).
        class_names: column names; threshold_file: ``threshold.json`` chosen on validation (else ``threshold``).
        id_key / path_key / half_key: sample keys naming the image and the half.
        set_aside: the dataset's ``set_aside`` rows, written as rows with their error. Samples that carry a
            non-empty ``set_aside_reason`` (placeholders of :class:`~cutremain_monai.data.set_aside.SetAsideStream`)
            become rows with that error too.
        network / cam / target_layer: Grad-CAM overlay PNG per sample under ``<output_dir>/cam/``.
        partial_file: rows are appended to this CSV as each batch is scored (an archive's results are on disk as
            they come; a killed run loses at most a batch), and the final CSV holds every row of it, including
            those of earlier runs (``cutremain_monai.data.folder.unscored`` leaves their images out of the next
            run). ``None``: rows are kept in memory and written at the end.
        set_aside_report: the rows with an error are also written to this ``set_aside.csv`` (section ``section``).
    """

    def __init__(self, output_dir: str, filename: str = "predictions.csv", label_mode: str = "binary",
                 class_names: Sequence[str] | None = None, threshold: float = 0.5, threshold_file: str | None = None,
                 id_key: str = "image_id", path_key: str = "image_path", half_key: str = "half",
                 set_aside: Sequence[dict] | None = None, network: torch.nn.Module | None = None, cam: bool = False,
                 target_layer: str = "layer3", enabled: bool = True, partial_file: str | None = None,
                 set_aside_report: str | None = None, section: str = "inference"):
        if label_mode not in ("binary", "multiclass", "multilabel"):
            raise ValueError(f"label_mode must be binary, multiclass or multilabel, got {label_mode!r}")
        self.label_mode = label_mode
        self.names = list(class_names or [])
        super().__init__(output_dir, filename, id_key, path_key, set_aside, enabled, partial_file, set_aside_report,
                         section)
        self.threshold, self.threshold_file = threshold, threshold_file
        self.half_key = half_key
        self.network, self.cam, self.target_layer = network, cam, target_layer
        self._seen: dict = {}
        self._streamed: list[dict] = []  # error rows of placeholders (memory mode)

    def _fields(self) -> list[str]:
        cols = [] if self.label_mode == "binary" else [f"p_{n}" for n in self.names]
        return ["file", "probability", "prediction", "left", "right", *cols, "error"]

    def _reset(self, engine: Engine) -> None:
        super()._reset(engine)
        self._streamed = []
        self._threshold_now = self._thresholds()

    def _take_rows(self) -> list[dict]:
        threshold, thresholds = getattr(self, "_threshold_now", None) or self._thresholds()
        rows = [self._row(n, h, threshold, thresholds) for n, h in self._seen.items()] + self._streamed
        self._seen, self._streamed = {}, []
        return rows

    def _thresholds(self):
        threshold, thresholds = self.threshold, None
        if self.threshold_file and os.path.exists(self.threshold_file):
            with open(self.threshold_file) as f:
                saved = json.load(f)
            threshold = float(saved.get("threshold", threshold))
            thresholds = saved.get("thresholds")
        return threshold, thresholds

    def _collect(self, engine: Engine) -> None:
        for item, out in _samples(engine):
            name = _file_name(item, self.id_key, self.path_key)
            if item.get(SET_ASIDE_KEY):
                self._streamed.append({"file": name, "error": str(item[SET_ASIDE_KEY])})
                continue
            half = item.get(self.half_key) or "image"
            prob = torch.as_tensor(out["pred"]).detach().float().reshape(-1).cpu()
            self._seen.setdefault(name, {})[half] = prob
            if self.cam and rank() == 0 and self.network is not None:
                self._overlay(name, half, torch.as_tensor(item["image"]), prob)
        if self.partial_file:  # every half of an image is in its batch: its row is complete
            self._flush()

    def _overlay(self, name: str, half: str, image: torch.Tensor, prob: torch.Tensor) -> None:
        net = self.network.module if hasattr(self.network, "module") else self.network
        device = next(net.parameters()).device
        c = None if self.label_mode == "binary" else int(prob.argmax())
        cam = grad_cam(net, image.float()[None].to(device), target=c, layer=self.target_layer)[0, 0].cpu()
        title = f"p={float(prob[0]):.2f}" if c is None else f"{self.names[c] if self.names else c} p={float(prob[c]):.2f}"
        stem = name.replace("/", "__").replace(os.sep, "__")
        save_overlay(os.path.join(self.output_dir, "cam", f"{stem}_{half}.png"), image[0], cam, title=title)

    def _row(self, name: str, halves: dict, threshold: float, thresholds) -> dict:
        parts = [halves[k] for k in ("left", "right") if k in halves] or list(halves.values())
        probs = torch.stack(parts)
        split = "left" in halves and "right" in halves
        row: dict = {"file": name, "error": ""}
        cls = [f"p_{n}" for n in self.names]
        if self.label_mode == "binary":
            p = float(probs.max())
            row.update(probability=round(p, 6), prediction=int(p >= threshold))
            if split:
                row.update(left=round(float(halves["left"][0]), 6), right=round(float(halves["right"][0]), 6))
        elif self.label_mode == "multiclass":
            k = int((1 - probs[:, 0]).argmax())
            pred = probs.argmax(1).tolist()

            def label(i: int):
                return self.names[i] if self.names else i

            row.update({c: round(float(v), 6) for c, v in zip(cls, probs[k])})
            row.update(probability=round(float(1 - probs[k, 0]), 6), prediction=label(pred[k]))
            if split:
                row.update(left=label(int(halves["left"].argmax())), right=label(int(halves["right"].argmax())))
        else:
            pmax = probs.amax(0)
            t = thresholds if thresholds is not None else [threshold] * len(pmax)
            row.update({c: round(float(v), 6) for c, v in zip(cls, pmax)})
            row.update(probability=round(float(pmax.max()), 6),
                       prediction="|".join(n for n, v, tt in zip(self.names, pmax.tolist(), t) if v >= tt))
        return row

    def __call__(self, engine: Engine) -> None:
        if not self.partial_file:  # rows held to the end take the threshold as it is then
            self._threshold_now = self._thresholds()
        super().__call__(engine)


class SeverityPredictions(_PredictionsBase):
    """Per image: the six zone probabilities ``p_A..p_F``, zone labels at ``threshold``, the global score (sum of
    probabilities) and the binary global score, where the lung mask came from (``mask_source``), and an overlay of
    the lesion map inside the lungs with the zone grid (``overlays/``; ``network`` may be a checkpoint ensemble,
    whose members' maps are averaged).

    Samples that carry a non-empty ``set_aside_reason`` (placeholders of
    :class:`~cutremain_monai.data.set_aside.SetAsideStream`) become rows with that error and no overlay.
    ``partial_file`` / ``set_aside_report`` / ``section``: as :class:`ClassificationPredictions` (rows appended
    batch by batch, the final CSV from the partial file; ``_seen`` then holds the current batch's rows only).
    """

    def __init__(self, output_dir: str, filename: str = "severity.csv", threshold: float = 0.5,
                 id_key: str = "image_id", path_key: str = "image_path", set_aside: Sequence[dict] | None = None,
                 network: torch.nn.Module | None = None, overlays: bool = True, enabled: bool = True,
                 partial_file: str | None = None, set_aside_report: str | None = None, section: str = "inference"):
        super().__init__(output_dir, filename, id_key, path_key, set_aside, enabled, partial_file, set_aside_report,
                         section)
        self.threshold = threshold
        self.network, self.overlays = network, overlays
        self._seen: dict = {}
        self._pending: list[dict] = []

    def _fields(self) -> list[str]:
        return ["file", *[f"p_{z}" for z in BRIXIA_ZONES], *[f"zone_{z}" for z in BRIXIA_ZONES], "global_score",
                "global_binary", "mask_source", "overlay", "error"]

    def _reset(self, engine: Engine) -> None:
        super()._reset(engine)
        self._pending = []

    def _take_rows(self) -> list[dict]:
        rows, self._pending = self._pending, []
        return rows

    def _members(self) -> list:
        net = self.network.module if hasattr(self.network, "module") else self.network
        return list(net.members) if hasattr(net, "members") else [net]

    def _collect(self, engine: Engine) -> None:
        if self.partial_file:
            self._seen = {}  # this batch's rows (DicomResults writes their objects from them), the rest on disk
        for item, out in _samples(engine):
            name = _file_name(item, self.id_key, self.path_key)
            if item.get(SET_ASIDE_KEY):
                self._pending.append({"file": name, "error": str(item[SET_ASIDE_KEY])})
                continue
            p = out["pred"]
            probs = torch.as_tensor(p[0] if isinstance(p, (tuple, list)) else p).detach().float().reshape(-1).cpu()
            labels = (probs >= self.threshold).int()
            row = {"file": name, "error": "", "mask_source": item.get("mask_source", "")}
            row.update({f"p_{z}": round(float(v), 6) for z, v in zip(BRIXIA_ZONES, probs)})
            row.update({f"zone_{z}": int(v) for z, v in zip(BRIXIA_ZONES, labels)})
            row.update(global_score=round(float(probs.sum()), 4), global_binary=int(labels.sum()))
            if self.overlays and self.network is not None and rank() == 0:
                row["overlay"] = self._overlay(name, item, probs)
            self._seen[name] = row
            self._pending.append(row)
        if self.partial_file:
            self._flush()

    def _overlay(self, name: str, item: dict, probs: torch.Tensor) -> str:
        members = self._members()
        device = next(members[0].parameters()).device
        x = torch.as_tensor(item["image"]).float()[None].to(device)
        mask = torch.as_tensor(item["lung_mask"]).float()[None].to(device)
        with torch.no_grad():
            lesion = torch.stack([m.eval().masked_map(x, mask) for m in members]).mean(0)[0, 0].cpu()
        rel = os.path.join("overlays", name.replace("/", "__").replace(os.sep, "__") + ".png")
        save_severity_overlay(os.path.join(self.output_dir, rel), x[0, 0].cpu(), lesion,
                              torch.as_tensor(item["zones"])[0], probs, None, title=f"global {float(probs.sum()):.1f}")
        return rel
