"""Inference handler of the lesion-segmentation bundle: lesion masks, overlays and a table per image.

The evaluator's ``pred`` is the network's class-weighted probabilities ``(C + 1, h, w)`` at the model's size
(:class:`~cutremain_monai.networks.psl.PSLNet`). Per image they are brought to the image's own size (bilinear) and
each pixel takes the most probable channel; class ``c``'s lesion is where that channel is ``c + 1`` **and** the
image's lesion score (the highest class-``c`` probability) reaches ``min_score``. Written under ``output_dir``:

- ``masks/<name>.png``: 8-bit label map at the image's size (0 background, ``c + 1`` class ``c``);
- ``overlays/<name>.png``: the image with the class-``c`` probability and the box of the mask's largest component;
- ``seg/<name>.dcm`` (with ``dicom_seg`` and a DICOM source): a binary DICOM Segmentation of the first class's mask
  on the source image (:func:`~cutremain_monai.io.seg.write_mask_seg`, SCT "Lesion"), carrying the source's patient
  and study modules as DICOM requires; one that fails is named in the table and never stops the others;
- ``lesions.csv``: ``file, class, lesion_score, area_px, area_share, x0, y0, x1, y1, error`` (box in the image's
  pixels, empty without a lesion); files the dataset set aside (its ``set_aside`` list, or placeholders of
  :class:`~cutremain_monai.data.set_aside.SetAsideStream` carrying ``set_aside_reason``, which get no mask) get a
  row with their error. With ``partial_file`` the rows are appended to it batch by batch and ``lesions.csv`` is
  made from it at the end (:class:`~cutremain_monai.handlers.predictions.RowTable`), so a killed run resumes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from cutremain_monai.data.set_aside import SET_ASIDE_KEY, scrub_paths
from cutremain_monai.handlers.predictions import RowTable
from cutremain_monai.handlers.utils import rank
from cutremain_monai.io.dicom import drop_source_equipment, quiet_pydicom, result_source_header
from cutremain_monai.io.loader import is_dicom_path
from cutremain_monai.io.seg import write_mask_seg
from cutremain_monai.localization.cam import save_overlay
from cutremain_monai.metrics.localization import largest_component_box

__all__ = ["LesionMaskWriter"]

logger = logging.getLogger(__name__)
FIELDS = ["file", "class", "lesion_score", "area_px", "area_share", "x0", "y0", "x1", "y1", "error"]


class LesionMaskWriter:
    def __init__(self, output_dir: str, class_names: Sequence[str] = ("lesion",), min_score: float = 0.5,
                 overlays: bool = True, dicom_seg: bool = True, set_aside=None, model_name: str = "lesion_segmentation",
                 version: str = "0.1.0", partial_file: str | None = None, set_aside_report: str | None = None,
                 section: str = "inference") -> None:
        if not 0 <= min_score <= 1:
            raise ValueError(f"min_score must be in [0, 1], got {min_score}")
        self.output_dir, self.class_names, self.min_score = output_dir, list(class_names), float(min_score)
        self.overlays, self.dicom_seg, self.set_aside = overlays, dicom_seg, set_aside
        self.model_name, self.version = model_name, version
        self.rows: list[dict] = []
        # an error in a scored row (a SEG not written) is not a file set aside: those rows have a lesion score
        self.table = RowTable(os.path.join(output_dir, "lesions.csv"), FIELDS, partial_file, set_aside_report, section,
                              scored_key="lesion_score")

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self._collect, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
            engine.add_event_handler(Events.COMPLETED, self._write)
            loader = getattr(engine, "data_loader", None)
            if loader is not None and len(loader) == 0:  # MONAI does not start an engine on no data: write now
                self._write(engine)

    def masks(self, probs: np.ndarray, native: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(label map at native size (H, W) uint8, lesion score per class (C,), probabilities at native size)``."""
        p = torch.as_tensor(probs).float()
        if p.ndim != 3 or p.shape[0] != len(self.class_names) + 1:
            raise ValueError(f"pred must be (C + 1, h, w) with C = {len(self.class_names)}, got {tuple(p.shape)}")
        if list(p.shape[1:]) != list(native):
            p = torch.nn.functional.interpolate(p[None], size=tuple(int(v) for v in native), mode="bilinear",
                                                align_corners=False)[0]
        p = p.numpy()
        scores = p[1:].reshape(p.shape[0] - 1, -1).max(1)
        arg = p.argmax(0)
        label = np.zeros(arg.shape, dtype=np.uint8)
        for c, score in enumerate(scores):
            if score >= self.min_score:
                label[arg == c + 1] = c + 1
        return label, scores, p

    def _collect(self, engine: Engine) -> None:
        from PIL import Image


        out = engine.state.output
        outs = out if isinstance(out, list) else [out]
        batch = engine.state.batch
        samples = batch if isinstance(batch, list) else [{k: v[i] for k, v in batch.items()} for i in range(len(outs))]
        rows = []
        for o, sample in zip(outs, samples):
            name = str(sample.get("image_id") or os.path.basename(str(sample.get("image_path", ""))))
            if sample.get(SET_ASIDE_KEY):  # a file that could not be read: its row names the error, no mask
                rows.append({"file": name, "error": str(sample[SET_ASIDE_KEY])})
                continue
            probs = torch.as_tensor(o["pred"]).detach().float().cpu()
            native = [int(v) for v in torch.as_tensor(sample["native_size"]).tolist()] if "native_size" in sample \
                else list(probs.shape[1:])
            label, scores, p = self.masks(probs.numpy(), native)
            stem = name.replace("/", "__")
            os.makedirs(os.path.join(self.output_dir, "masks"), exist_ok=True)
            Image.fromarray(label).save(os.path.join(self.output_dir, "masks", stem + ".png"))
            error = ""
            if self.dicom_seg and label.any():
                error = self._seg(sample, label == 1, stem)
            for c, cname in enumerate(self.class_names):
                m = label == c + 1
                box = largest_component_box(m) if m.any() else None
                row = {"file": name, "class": cname, "lesion_score": round(float(scores[c]), 4),
                       "area_px": int(m.sum()), "area_share": round(float(m.mean()), 5),
                       "x0": "", "y0": "", "x1": "", "y1": "", "error": error}
                if box is not None:
                    row.update(x0=float(box[0]), y0=float(box[1]), x1=float(box[2]), y1=float(box[3]))
                rows.append(row)
                if self.overlays and c == 0:
                    img = torch.as_tensor(sample["image"]).float().cpu()[0].numpy()
                    h, w = img.shape
                    small = torch.nn.functional.interpolate(torch.as_tensor(p[c + 1])[None, None], size=(h, w),
                                                            mode="bilinear", align_corners=False)[0, 0].numpy()
                    boxes = []
                    if box is not None:
                        sy, sx = h / native[0], w / native[1]
                        boxes = [[box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]]
                    save_overlay(os.path.join(self.output_dir, "overlays", stem + ".png"), img, small, boxes,
                                 title=f"{cname} score {scores[c]:.2f}")
        self.table.add(rows)

    def _seg(self, sample: dict, mask: np.ndarray, stem: str) -> str:
        path = str(sample.get("image_path", ""))
        try:
            if not path or not os.path.exists(path) or not is_dicom_path(path):
                return ""
            import pydicom
            from pydicom.sr.codedict import codes


            with quiet_pydicom():
                ds = result_source_header(pydicom.dcmread(path))
                seg = write_mask_seg(ds, mask, None, label=self.class_names[0], model_name=self.model_name,
                                     version=self.version, series_number=905, series_description="cutremain lesion mask",
                                     property_category=codes.SCT.MorphologicallyAbnormalStructure,
                                     property_type=codes.SCT.Lesion)
                drop_source_equipment(seg)  # the source's patient and study modules, nothing else of it
                os.makedirs(os.path.join(self.output_dir, "seg"), exist_ok=True)
                seg.save_as(os.path.join(self.output_dir, "seg", stem + ".dcm"), enforce_file_format=True)
            return ""
        except Exception as e:  # noqa: BLE001 (the mask and the row are kept; the table names the failure)

            reason = scrub_paths(f"{type(e).__name__}: {e}", sample, stem)  # no file path in the table
            logger.warning("lesion SEG of %s not written (%s)", stem, reason)
            return f"DICOM Segmentation not written: {reason}"

    def _write(self, engine: Engine) -> None:
        if rank() != 0:
            return
        errors = [{"file": e.get("file", ""), "error": e.get("reason", "")} for e in self.set_aside or []]
        self.rows = self.table.finish(errors)
        aside = self.table.set_aside_rows(self.rows)
        logger.info("lesion masks: %d image(s), %d set aside -> %s", len({r["file"] for r in self.rows}) - len(aside),
                    len(aside), self.output_dir)
