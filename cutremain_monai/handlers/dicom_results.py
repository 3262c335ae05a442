"""Folder inference answered in DICOM: for every scored DICOM image, a TID 1500 SR, a Secondary Capture and a
presentation state, for the PACS to file with the study (issue 15).

What this handler adds to the writers of :mod:`cutremain_monai.io` (which know nothing of networks): the
results of one evaluator run, taken from the prediction rows (so the SR's probabilities are the CSV's), and the
predicted box of each positive finding on the *source* image: the Grad-CAM map of each network input is brought
back through the bundle's preprocessing (the image or one of its ``SplitHalvesd`` halves, resized to the network
size) onto the stored image, thresholded at the validation-chosen ``tau`` (``cutremain localize`` writes it) and
boxed around its largest connected region.

Results are filed as a PACS files them: one series per object kind, per study and per run (every SR of a study
from one run in one series, its overlays in another, ...), numbered 901-904 and described by the model and its
version ("clavicle_fracture 0.3.0 findings"); the SR lists the overlay, presentation state and segmentation of
its image as pertinent other evidence. A *run* is the model (bundle, version, name, registry version) and the
images of the study it scored; the same run again gives the same UIDs (a resent result is the same instance,
not a duplicate), a study that grew gets new series, and ``run_id`` forces a fresh one. Files are written under
``output_dir/{SR,SC,PR}/<SOP Instance UID>.dcm``, with ``manifest.csv`` (source name, object, file; a file that cannot be written is listed there with
its error, and the others are still written) and ``findings.csv`` (what each SR says: finding, probability,
box).

Memory stays bounded whatever the size of the folder: the series are planned when the run starts, from the
headers of the run's items (no pixels), and each image's objects are written in the iteration that scored it
(every half of an image is in its batch), from the row the predictions handler makes of it; only that batch's
Grad-CAM maps are ever held. Objects are written only for the images scored in this run (a resumed run's earlier
rows get none).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import pydicom
import torch
from ignite.engine import Engine, Events

from cutremain_monai.constants import BRIXIA_ZONES
from cutremain_monai.data.set_aside import SET_ASIDE_KEY
from cutremain_monai.handlers.utils import rank
from cutremain_monai.io.dicom import (dcmread_unnamed, DicomReadError, quiet_pydicom, read_xray_dicom,
                                      result_source_header)
from cutremain_monai.io.gsps import write_box_gsps
from cutremain_monai.io.secondary_capture import write_secondary_capture
from cutremain_monai.io.seg import write_mask_seg
from cutremain_monai.io.sr import Finding, ModelDevice, write_findings_sr
from cutremain_monai.localization.cam import overlay_image
from cutremain_monai.localization.grad_cam import grad_cam

__all__ = ["DicomResults", "map_box", "to_source_frame"]

logger = logging.getLogger(__name__)


def to_source_frame(cam: np.ndarray, source_shape: tuple[int, int], half: str | None) -> tuple[np.ndarray, int]:
    """A network-input map ``(h, w)`` resized onto the region of the source image it came from: the whole image,
    or the left (columns ``[0, W//2)``) / right (``[W//2, W)``) half of ``SplitHalvesd``. Returns the map and its
    column offset in the source."""
    from PIL import Image

    rows, cols = source_shape
    mid = cols // 2
    lo, hi = {"left": (0, mid), "right": (mid, cols)}.get(half or "", (0, cols))
    img = Image.fromarray(np.asarray(cam, dtype=np.float32))
    return np.asarray(img.resize((hi - lo, rows), Image.BILINEAR), dtype=np.float32), lo


def map_box(cam: np.ndarray, tau: float) -> list[float] | None:
    """The bounding box (xyxy, pixels) of the largest connected region of ``cam >= tau``, or None."""
    from scipy import ndimage

    mask = np.asarray(cam) >= tau
    if not mask.any():
        return None
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    region = labels == (int(np.argmax(sizes)) + 1)
    ys, xs = np.nonzero(region)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _tau(value) -> float:
    """``tau`` as a number, or from a ``cutremain localize`` JSON (``validation_tau.gradcam``)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and os.path.exists(value):
        with open(value) as f:
            return float(json.load(f).get("validation_tau", {}).get("gradcam", 0.5))
    return 0.5


class DicomResults:
    """Args:
        output_dir: where the SR / SC / PR folders and ``manifest.csv`` go.
        predictions: the run's ``ClassificationPredictions`` (its rows give the probabilities and predictions).
        network / target_layer: Grad-CAM of the positive class (binary) or of each predicted class.
        bundle_root: the bundle's folder: its ``configs/metadata.json`` gives the name and version named as the
            device in every object (else ``bundle`` / ``version``); model_name / registry_version: the model's.
        label_mode: ``binary`` | ``multiclass`` | ``multilabel`` (classification rows) | ``severity``
            (``SeverityPredictions`` rows: six zone probabilities and the global score, its overlay as the SC).
        lung_seg: severity: also the lung mask as a DICOM Segmentation (off by default).
        tau: threshold of the min-max Grad-CAM map (a number, or the ``*_localization.json`` of ``cutremain
            localize`` whose validation-chosen ``tau`` is used); a positive finding without a region gets no box.
        finding_names: the finding named in the SR for a binary model (default: the last class name).
        path_key / half_key / id_key: sample keys (the source file, the half, the row name).
        series_number: of the SR; the SC, PR and SEG take the next three. series_description: the prefix of the
            series descriptions ("<prefix> findings", "<prefix> overlay", "<prefix> boxes", "<prefix> lung mask");
            default the bundle's name and version (and the registry version when registered).
        run_id: mixed into the series (and so instance) UIDs: a fresh set of series for the same images and model.
        enabled: switch (``dicom_out`` in ``inference.yaml``).
    """
    def __init__(self, output_dir: str, predictions, network: torch.nn.Module | None = None,
                 target_layer: str = "layer3", bundle_root: str | None = None, bundle: str = "cutremain",
                 version: str = "0.1.0",
                 model_name: str = "model", registry_version: str | None = None, tau=0.5,
                 label_mode: str = "binary", class_names: Sequence[str] | None = None,
                 finding_names: Sequence[str] | None = None, path_key: str = "image_path", half_key: str = "half",
                 id_key: str = "image_id", series_number: int = 901, series_description: str | None = None,
                 lung_seg: bool = False, enabled: bool = True, run_id: str | None = None):
        self.output_dir = output_dir
        self.predictions = predictions
        self.network, self.target_layer = network, target_layer
        if bundle_root:
            meta_path = os.path.join(bundle_root, "configs", "metadata.json")
            with open(meta_path) as f:
                meta = json.load(f)
            bundle = str(meta.get("name") or os.path.basename(os.path.abspath(bundle_root)))
            version = str(meta.get("version", version))
        self.bundle, self.version, self.model_name = bundle, str(version), model_name
        self.registry_version = None if registry_version in (None, "", "None") else str(registry_version)
        self.tau = tau
        self.label_mode = label_mode
        self.names = list(class_names or [])
        self.finding_names = list(finding_names or [])
        self.path_key, self.half_key, self.id_key = path_key, half_key, id_key
        self.series_number = int(series_number)
        reg = f" r{self.registry_version}" if self.registry_version else ""
        self.series_prefix = str(series_description or f"{self.bundle} {self.version}{reg}")
        self.run_id = "" if run_id in (None, "", "None") else str(run_id)
        self._series: dict[str, str] = {}  # source SOP Instance UID -> the run key of its study
        self._numbers: dict[tuple[str, str], int] = {}  # (series UID) -> instances numbered so far
        self.lung_seg = bool(lung_seg)
        self.enabled = enabled
        self._maps: dict = {}  # the images of the current batch (their maps), until their objects are written
        self._planned = False
        self._manifest: list[dict] = []
        self.written: list[dict] = []
        self.findings: list[dict] = []  # what the SRs say, one row per finding (findings.csv)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        loader = getattr(engine, "data_loader", None)
        if loader is not None and len(loader) == 0:  # MONAI does not start an engine on no data: an empty manifest
            self(engine)

    def _classes(self, prob: torch.Tensor) -> list[int]:
        if self.label_mode == "binary":
            return [0]
        return list(range(1, len(prob))) if self.label_mode == "multiclass" else list(range(len(prob)))

    def _start(self, engine: Engine) -> None:
        """A new run: nothing held; the series planned from the run's items (their headers, no pixels)."""
        self._maps.clear()
        self.findings.clear()
        self._manifest = []
        self._planned = False
        loader = getattr(engine, "data_loader", None)
        data = getattr(getattr(loader, "dataset", None), "data", None)
        if rank() == 0 and data is not None:
            self._plan_series([str(it.get(self.path_key) or it.get("image") or "") for it in data
                               if isinstance(it, dict)])

    def _collect(self, engine: Engine) -> None:
        if rank() != 0:
            return
        self._collect_maps(engine)
        for name in list(self._maps):  # every half of an image is in this batch: its objects can be written now
            row = self._row_now(name, self._maps[name])
            if row is not None:
                self._emit(name, self._maps.pop(name), row)

    def _row_now(self, name: str, seen: dict) -> dict | None:
        """The prediction row of an image scored in this batch, as the predictions handler writes it (its own row
        function and threshold); None when the handler cannot say yet (the row is then taken at the end)."""
        if self.label_mode == "severity":
            row = getattr(self.predictions, "_seen", {}).get(name)
            return row if isinstance(row, dict) and not row.get("error") else None
        make = getattr(self.predictions, "_row", None)
        if make is None or not seen.get("probs"):
            return None
        threshold, thresholds = getattr(self.predictions, "_threshold_now", None) or self._threshold()
        halves = {(h or "image"): torch.as_tensor(p) for h, p in seen["probs"].items()}
        return make(name, halves, threshold, thresholds)

    def _collect_maps(self, engine: Engine) -> None:
        if self.label_mode == "severity":  # the rows and their overlays come from SeverityPredictions
            for item in engine.state.batch:
                if item.get(SET_ASIDE_KEY):
                    continue
                name = str(item.get(self.id_key) or item.get(self.path_key))
                self._maps[name] = {"source": str(item.get(self.path_key) or ""), "halves": {}}
                if self.lung_seg and item.get("lung_mask") is not None:
                    self._maps[name]["lung_mask"] = torch.as_tensor(item["lung_mask"]).detach().cpu().numpy().squeeze() > 0.5
            return
        if self.network is None:
            return

        net = self.network.module if hasattr(self.network, "module") else self.network
        device = next(net.parameters()).device
        for item, out in zip(engine.state.batch, engine.state.output):
            if item.get(SET_ASIDE_KEY):  # a placeholder of a file that could not be read: no map, no object
                continue
            name = str(item.get(self.id_key) or item.get(self.path_key))
            source = str(item.get(self.path_key) or "")
            image = torch.as_tensor(item["image"]).float()[None].to(device)
            prob = torch.as_tensor(out["pred"]).detach().float().reshape(-1).cpu()
            maps = {}
            for c in self._classes(prob):  # (float16: a folder of many images stays small in memory)
                maps[c] = grad_cam(net, image, target=c, layer=self.target_layer)[0, 0].cpu().numpy().astype(np.float16)
            entry = self._maps.setdefault(name, {"source": source, "halves": {}, "probs": {}})
            half = item.get(self.half_key) or ""
            entry["halves"][half] = maps
            entry["probs"][half] = prob.numpy()

    def _record(self, name: str, ds, findings) -> None:
        sr_uid = self._uid(ds, "SR")
        for f in findings:
            box = list(f.box) if f.box is not None else ["", "", "", ""]
            self.findings.append({"file": name, "sr_uid": sr_uid, "finding": f.name,
                                  "probability": "" if f.probability is None else round(float(f.probability), 6),
                                  "score": "" if f.score is None else round(float(f.score), 4),
                                  **dict(zip(("x0", "y0", "x1", "y1"), box))})

    def _model(self) -> list[str]:
        return [self.bundle, self.version, self.model_name, str(self.registry_version), self.run_id]

    def _plan_series(self, sources: Sequence[str]) -> None:
        """The run key of each study of this run: its Study Instance UID, the model, and the SOP Instance UIDs of
        its images scored now (``sources``: read from their headers, without pixels, before anything is written)."""
        studies: dict[str, list[str]] = {}
        images: dict[str, str] = {}
        for source in sources:
            try:
                with quiet_pydicom():
                    ds = dcmread_unnamed(source, stop_before_pixels=True,
                                         specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
                sop, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
            except Exception:  # not DICOM: no result, no series
                continue
            studies.setdefault(study, []).append(sop)
            images[sop] = study
        keys = {study: pydicom.uid.generate_uid(entropy_srcs=[study, *self._model(), *sorted(sops)])
                for study, sops in studies.items()}
        self._series = {sop: keys[study] for sop, study in images.items()}
        self._numbers.clear()
        self._planned = True

    def series_uid(self, ds, kind: str) -> str:
        """The series of ``kind`` results of ``ds``'s study in this run (one per study, kind and run)."""
        run = self._series.get(str(ds.SOPInstanceUID)) or pydicom.uid.generate_uid(
            entropy_srcs=[str(ds.StudyInstanceUID), *self._model(), str(ds.SOPInstanceUID)])
        return pydicom.uid.generate_uid(entropy_srcs=[run, kind])

    def _uid(self, ds, kind: str) -> str:
        """The same result of the same run for the same image gets the same UID: sent twice (a retry, a rerun of
        the same images), the PACS receives the same instance again, not a duplicate."""
        return pydicom.uid.generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), self.series_uid(ds, kind), kind])

    def _number(self, series_uid: str) -> int:
        n = self._numbers.get(series_uid, 0) + 1
        self._numbers[series_uid] = n
        return n

    def _threshold(self):
        get = getattr(self.predictions, "_thresholds", None)
        threshold, thresholds = get() if get else (0.5, None)
        return threshold, thresholds

    def _half_positive(self, prob: np.ndarray, c: int, threshold) -> bool:
        t, ts = threshold
        if self.label_mode == "binary":
            return float(prob[0]) >= t
        if self.label_mode == "multiclass":
            return int(np.argmax(prob)) == c
        return float(prob[c]) >= (ts[c] if ts is not None else t)

    def _finding_name(self, c: int) -> str:
        if self.label_mode == "binary":
            return (self.finding_names or self.names[-1:] or ["finding"])[0]
        return self.names[c] if c < len(self.names) else str(c)

    def __call__(self, engine: Engine) -> None:
        """The end of the run: the objects of images whose row could not be had in their iteration (from the
        handler's rows, this run's images only), then ``manifest.csv`` and ``findings.csv``."""
        if rank() != 0:
            return
        if not self._planned:  # (called without a run: plan from what is held)
            self._plan_series([seen["source"] for seen in self._maps.values()])
        if self._maps:
            rows = {r["file"]: r for r in getattr(self.predictions, "rows", []) if not r.get("error")}
            for name in list(self._maps):
                seen = self._maps.pop(name)
                if name in rows:
                    self._emit(name, seen, rows[name])
        manifest = self._manifest
        self.written = manifest
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "manifest.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file", "object", "path", "error"])
            w.writeheader()
            w.writerows(manifest)
        with open(os.path.join(self.output_dir, "findings.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file", "sr_uid", "finding", "probability", "score", "x0", "y0", "x1", "y1"])
            w.writeheader()
            w.writerows(self.findings)
        logger.info("DICOM results: %d objects for %d images in %s", sum(1 for m in manifest if m["path"]),
                    len({m["file"] for m in manifest}), self.output_dir)

    def _emit(self, name: str, seen: dict, row: dict) -> None:
        """Write the objects of one image (its maps and its prediction row) and let its maps go."""
        manifest = self._manifest
        device = ModelDevice(self.bundle, self.version, self.model_name, self.registry_version)
        tau = _tau(self.tau)
        for sub in ("SR", "SC", "PR"):
            os.makedirs(os.path.join(self.output_dir, sub), exist_ok=True)
        try:
            ds = dcmread_unnamed(seen["source"])
            if "PixelData" not in ds:
                raise DicomReadError(name, "not a DICOM image")
            display, _ = read_xray_dicom(seen["source"], dataset=ds)
            with quiet_pydicom():
                ds = result_source_header(ds)  # type-2 attributes present and valid, no pixel data
        except Exception as e:  # a PNG, or a file that cannot be read: listed, never fatal
            manifest.append({"file": name, "object": "", "path": "", "error": f"no DICOM source ({type(e).__name__})"})
            return
        shape = (int(ds.Rows), int(ds.Columns))
        if self.label_mode == "severity":
            self._severity(name, row, ds, device, manifest, seen.get("lung_mask"))
            return
        threshold = self._threshold()
        full: dict[int, np.ndarray] = {}
        for half, maps in seen["halves"].items():
            p_half = seen["probs"].get(half)
            for c, cam in maps.items():
                # only where this half (or the image) calls the finding: a negative half's min-max map also
                # peaks at 1, and must not give the box or the heat
                if p_half is not None and not self._half_positive(p_half, c, threshold):
                    continue
                part, lo = to_source_frame(cam.astype(np.float32), shape, half or None)
                full.setdefault(c, np.zeros(shape, dtype=np.float32))[:, lo : lo + part.shape[1]] = part
        findings = self._findings(row, full, tau)
        boxes = [f for f in findings if f.box is not None]
        caption = [device.label, "; ".join(f"{f.name} {100 * f.probability:.0f}%" for f in findings)]
        heat = np.max(np.stack(list(full.values())), axis=0) if full else np.zeros(shape, np.float32)
        rgb = np.asarray(overlay_image(np.asarray(display)[0], heat, [f.box for f in boxes]))

        def sc(path, uid, series, number, _):
            return write_secondary_capture(ds, rgb, caption, path, manufacturer=device.manufacturer,
                                           model_name=self.model_name, software_version=self.version,
                                           series_number=self.series_number + 1, sop_instance_uid=uid,
                                           series_instance_uid=series, instance_number=number,
                                           series_description=f"{self.series_prefix} overlay")

        def pr(path, uid, series, number, _):
            return write_box_gsps(ds, [f.box for f in boxes], [f.name for f in boxes], path,
                                  texts=[f"{f.name} {100 * f.probability:.0f}%" for f in boxes],
                                  layer_name="CUTREMAIN_AI", content_label="AI_FINDINGS",
                                  content_description=device.label[:64], series_number=self.series_number + 2,
                                  series_description=f"{self.series_prefix} boxes", manufacturer=device.manufacturer,
                                  model_name=self.model_name, software_version=self.version,
                                  sop_instance_uid=uid, series_instance_uid=series, instance_number=number)

        self._record(name, ds, findings)
        self._write(name, ds, [("SC", sc)] + ([("PR", pr)] if boxes else []) + [("SR", self._sr(ds, findings, device))],
                    manifest)

    def _severity(self, name: str, row: dict, ds, device, manifest: list, lung_mask=None) -> None:
        """COVID severity: the six zone probabilities and the global score in the SR; the zone overlay of
        ``SeverityPredictions`` as the Secondary Capture (no boxes, so no presentation state); with ``lung_seg``
        the lung mask it scored in as a binary Segmentation (resized from the network's grid to the image)."""
        from PIL import Image


        findings = [Finding(f"lung opacity zone {z}", float(row[f"p_{z}"])) for z in BRIXIA_ZONES]
        findings.append(Finding("global severity score", None, score=float(row["global_score"])))
        caption = [device.label, f"global score {float(row['global_score']):.1f} (zones "
                   + " ".join(f"{z}{int(row[f'zone_{z}'])}" for z in BRIXIA_ZONES) + ")"]
        self._record(name, ds, findings)
        jobs = []
        overlay = os.path.join(getattr(self.predictions, "output_dir", ""), str(row.get("overlay") or ""))
        if row.get("overlay") and os.path.exists(overlay):
            rgb = np.asarray(Image.open(overlay).convert("RGB"))
            jobs.append(("SC", lambda path, uid, series, number, _: write_secondary_capture(
                ds, rgb, caption, path, manufacturer=device.manufacturer, model_name=self.model_name,
                software_version=self.version, series_number=self.series_number + 1, sop_instance_uid=uid,
                series_instance_uid=series, instance_number=number, series_description=f"{self.series_prefix} overlay")))
        if lung_mask is not None:
            jobs.append(("SEG", lambda path, uid, series, number, _: write_mask_seg(
                ds, lung_mask, path, model_name=self.model_name, version=self.version, manufacturer=device.manufacturer,
                series_number=self.series_number + 3, sop_instance_uid=uid, series_instance_uid=series,
                instance_number=number, series_description=f"{self.series_prefix} lung mask")))
        jobs.append(("SR", self._sr(ds, findings, device)))
        self._write(name, ds, jobs, manifest)

    def _sr(self, ds, findings, device):
        """The SR job: written last, it references the other results of its image that were written."""
        def sr(path, uid, series, number, written):
            return write_findings_sr(ds, findings, device, path, series_number=self.series_number,
                                     series_description=f"{self.series_prefix} findings", sop_instance_uid=uid,
                                     series_instance_uid=series, instance_number=number, other_evidence=written)
        return sr

    def _write(self, name: str, ds, jobs, manifest: list) -> None:
        """Each ``(kind, write(path, uid, series uid, instance number, written so far))`` under
        ``output_dir/<kind>/<uid>.dcm``; one that fails is listed in the manifest with its error type and never
        stops the others."""
        written = []  # (SOP class, SOP instance, series) of this image's results so far: the SR references them
        for kind, write in jobs:
            uid = self._uid(ds, kind)
            series = self.series_uid(ds, kind)
            os.makedirs(os.path.join(self.output_dir, kind), exist_ok=True)
            path = os.path.join(self.output_dir, kind, f"{uid}.dcm")
            try:
                with quiet_pydicom():
                    obj = write(path, uid, series, self._number(series), list(written))
                written.append((str(obj.SOPClassUID), uid, series))
                manifest.append({"file": name, "object": kind, "path": os.path.relpath(path, self.output_dir), "error": ""})
            except Exception as e:
                logger.warning("DICOM %s for %s not written: %s", kind, name, type(e).__name__)
                manifest.append({"file": name, "object": kind, "path": "", "error": type(e).__name__})

    def _findings(self, row: dict, full: dict[int, np.ndarray], tau: float):
        out = []
        if self.label_mode == "binary":
            p = float(row["probability"])
            positive = int(row["prediction"]) == 1
            box = map_box(full[0], tau) if positive and 0 in full else None
            return [Finding(self._finding_name(0), p, box)]
        predicted = set(str(row.get("prediction", "")).split("|"))
        for c in self._classes(torch.zeros(len(self.names))):
            name = self._finding_name(c)
            p = float(row.get(f"p_{name}", 0.0))
            box = map_box(full[c], tau) if name in predicted and c in full else None
            out.append(Finding(name, p, box))
        return out
