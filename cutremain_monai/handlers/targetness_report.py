"""Background-learning outputs (seed 003): the P / F / N backgroundness histogram of a trained patch classifier
(the seed's Figure 4), the comparison table of targetness against CAM, and per-image maps, overlays and boxes at
inference.

* :class:`PatchTypeHistogram` (evaluator handler, rank 0, at the end): random patches of the evaluated images
  (:class:`~cutremain_monai.transforms.patches.RandPatchesd`, seeded), each typed P (target image, >= 10% inside a
  box), F (target image, otherwise) or N (background image), scored by the classifier; backgroundness ``1 - p``
  as relative-frequency histograms per type: ``{prefix}_pfn_histogram.png`` and ``.json`` (counts, means).
  Decision-boundary induction shows as F patches piling up at high backgroundness with the N patches, and the P
  patches at low backgroundness.
* :func:`comparison_table`: Loc. Acc. of targetness and CAM from the two localisation reports, one markdown table.
* :class:`TargetnessWriter` (inference evaluator handler): per image, the image's target score (the highest mean
  window probability of a pixel), the targetness map as an overlay PNG with the box of its largest component at the
  threshold chosen on validation (read from the evaluation's ``*_localization.json``; 0.5 without one) in the
  image's own pixels when the score reaches ``min_score``, and ``targetness.csv``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose

from cutremain_monai.data.set_aside import SET_ASIDE_KEY
from cutremain_monai.handlers.predictions import RowTable
from cutremain_monai.handlers.utils import rank
from cutremain_monai.localization.cam import save_overlay
from cutremain_monai.metrics.localization import largest_component_box
from cutremain_monai.transforms.patches import PATCH_TYPE, RandPatchesd

__all__ = ["PatchTypeHistogram", "TargetnessWriter", "comparison_table"]

logger = logging.getLogger(__name__)
TARGETNESS_FIELDS = ["file", "tau", "target_score", "x0", "y0", "x1", "y1", "error"]


class PatchTypeHistogram:
    """Args:
        network: the patch classifier. items: the evaluated datalist items (with labels; boxes for the types).
        preprocessing: the bundle's chain to the model's size (with ``box_mask``).
        num_patches / patch_size / min_inside: as in training; ``bins``: histogram bins over [0, 1].
    """
    def __init__(self, network: torch.nn.Module, items: Sequence[dict], preprocessing, output_dir: str,
                 num_patches: int = 8, patch_size: int = 48, min_inside: float = 0.1, prefix: str = "test",
                 bins: int = 20, seed: int = 0, enabled: bool = True):
        self.network, self.items, self.pre = network, list(items), preprocessing
        self.output_dir, self.prefix, self.bins, self.seed, self.enabled = output_dir, prefix, bins, seed, enabled
        self.num_patches, self.patch_size, self.min_inside = num_patches, patch_size, min_inside
        self.result: dict = {}

    def attach(self, engine: Engine) -> None:
        if self.enabled and not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def scores(self) -> dict[str, np.ndarray]:
        """Backgroundness ``1 - p`` of the sampled patches, by type."""

        net = self.network.module if hasattr(self.network, "module") else self.network
        patcher = RandPatchesd(keys="image", num_patches=self.num_patches, patch_size=self.patch_size,
                               min_inside=self.min_inside).set_random_state(self.seed)
        pre = self.pre if isinstance(self.pre, Compose) else Compose(list(self.pre))
        device = next(net.parameters()).device
        out: dict[str, list] = {"P": [], "F": [], "N": []}
        was_training = net.training
        net.eval()
        try:
            for it in self.items:
                try:
                    patches = patcher(pre(dict(it)))
                except Exception as e:  # an unreadable image is named and left out
                    logger.warning("P/F/N histogram: %s left out (%s: %s)", it.get("image"), type(e).__name__, e)
                    continue
                x = torch.stack([torch.as_tensor(p["image"]).float() for p in patches]).to(device)
                with torch.no_grad():
                    p = torch.sigmoid(net(x).float())[:, 0].cpu().numpy()
                for s, prob in zip(patches, p):
                    if s[PATCH_TYPE] in out:
                        out[s[PATCH_TYPE]].append(1.0 - float(prob))
        finally:
            net.train(was_training)
        return {k: np.asarray(v) for k, v in out.items()}

    def __call__(self, engine: Engine | None = None) -> dict:
        if not self.enabled or rank() != 0:
            return {}
        from matplotlib import pyplot as plt

        scores = self.scores()
        edges = np.linspace(0, 1, self.bins + 1)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        result = {"bins": edges.tolist()}
        for kind, colour in (("P", "tab:red"), ("F", "tab:orange"), ("N", "tab:blue")):
            v = scores[kind]
            freq = np.histogram(v, bins=edges)[0] / max(1, len(v))
            ax.plot((edges[:-1] + edges[1:]) / 2, freq, marker="o", ms=3, color=colour, label=f"{kind} (n={len(v)})")
            result[kind] = {"n": int(len(v)), "mean_backgroundness": float(v.mean()) if len(v) else float("nan"),
                            "relative_frequency": freq.tolist()}
        ax.set_xlabel("backgroundness (1 - p)")
        ax.set_ylabel("relative frequency")
        ax.legend()
        fig.tight_layout()
        os.makedirs(self.output_dir, exist_ok=True)
        fig.savefig(os.path.join(self.output_dir, f"{self.prefix}_pfn_histogram.png"), dpi=100)
        plt.close(fig)
        with open(os.path.join(self.output_dir, f"{self.prefix}_pfn_histogram.json"), "w") as f:
            json.dump(result, f, indent=1)
        if engine is not None:
            for kind in "PFN":
                engine.state.metrics[f"{self.prefix}_backgroundness_{kind}"] = result[kind]["mean_backgroundness"]
        self.result = result
        return result


def comparison_table(reports: dict[str, str], output: str | None = None) -> str:
    """``{name: path of a *_localization.json}`` -> markdown table of Loc. Acc. (at the validation threshold) and
    the maximum over thresholds, per method; written to ``output`` when given. Missing reports are skipped."""
    lines = ["| maps | Loc. Acc. (IoU >= 0.4, tau from validation) | Loc. Acc., max over tau on test (the seed's figure) | images |",
             "|---|---|---|---|"]
    for name, path in reports.items():
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        for t in data["methods"].values():
            if not t:
                continue
            best = max(t["loc_acc_by_tau"].values()) if t.get("loc_acc_by_tau") else float("nan")
            lines.append(f"| {name} | {t['loc_acc']:.3f} ({t['loc_acc_tau']}) | {best:.3f} | {t['n']} |")
    text = "\n".join(lines) + "\n"
    if output:
        with open(output, "w") as f:
            f.write(text)
    return text


class TargetnessWriter:
    """Inference handler: the evaluator's ``pred`` is the map ``(1, H, W)`` at the model's size BEFORE min-max
    normalisation (:class:`~cutremain_monai.localization.targetness.TargetnessInferer` with ``output="raw_map"``:
    the mean window probability per pixel). Each map is min-max normalised here (a normalised map always reaches 1,
    so it cannot say whether the image holds a target: the raw maximum, ``target_score``, does). Writes
    ``maps/<name>.npy`` (the normalised map at the model's size, float32), ``overlays/<name>.png`` and a row of
    ``targetness.csv`` per image under ``output_dir``: ``target_score``, and
    the box ``x0, y0, x1, y1`` in the image's own pixels when ``target_score >= min_score`` (empty otherwise; the
    map is brought to the image's size before the threshold, as the evaluation does);
    files set aside by the dataset (its ``set_aside`` list, or placeholders of
    :class:`~cutremain_monai.data.set_aside.SetAsideStream` carrying ``set_aside_reason``) get a row with their error.

    Args:
        tau: the map threshold; ``tau_file``: an evaluation's ``*_localization.json`` whose validation threshold
            is used when it exists (else ``tau``).
        min_score: the image-level score below which no box is drawn (0.5: the covering windows call the pixel
            target on average).
        partial_file / set_aside_report / section: rows appended to ``partial_file`` batch by batch, and
            ``targetness.csv`` made from it at the end (:class:`~cutremain_monai.handlers.predictions.RowTable`).
    """
    def __init__(self, output_dir: str, tau: float = 0.5, tau_file: str | None = None, overlays: bool = True,
                 set_aside=None, method: str = "targetness", min_score: float = 0.5, partial_file: str | None = None,
                 set_aside_report: str | None = None, section: str = "inference"):
        self.output_dir, self.overlays, self.set_aside, self.method = output_dir, overlays, set_aside, method
        self.min_score = float(min_score)
        self.tau = float(tau)
        if tau_file and os.path.exists(tau_file):
            with open(tau_file) as f:
                self.tau = float(json.load(f).get("validation_tau", {}).get(method, self.tau))
        self.rows: list[dict] = []
        self.table = RowTable(os.path.join(output_dir, "targetness.csv"), TARGETNESS_FIELDS, partial_file,
                              set_aside_report, section)

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self._collect, Events.ITERATION_COMPLETED):
            return
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)
        loader = getattr(engine, "data_loader", None)
        if loader is not None and len(loader) == 0:  # MONAI does not start an engine on no data: write the rows now
            self._write(engine)

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        outs = out if isinstance(out, list) else [out]
        batch = engine.state.batch  # MONAI decollates it into one dict per image
        samples = batch if isinstance(batch, list) else [{k: v[i] for k, v in batch.items()} for i in range(len(outs))]
        rows = []
        for o, sample in zip(outs, samples):
            name = sample.get("image_id") or os.path.basename(str(sample.get("image_path", "")))
            if sample.get(SET_ASIDE_KEY):  # a file that could not be read: its row names the error, no map
                rows.append({"file": name, "error": str(sample[SET_ASIDE_KEY])})
                continue
            raw = torch.as_tensor(o["pred"]).detach().float().cpu()[0].numpy()
            native = [int(v) for v in torch.as_tensor(sample["native_size"]).tolist()] if "native_size" in sample else list(raw.shape)
            score, lo = float(raw.max()), float(raw.min())
            m = (raw - lo) / (score - lo) if score > lo else np.zeros_like(raw)
            # the map brought to the image's own size (bilinear) before the threshold, as the evaluation scores it
            at_native = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=tuple(native), mode="bilinear",
                                                        align_corners=False)[0, 0].numpy() if list(m.shape) != native else m
            box = largest_component_box(at_native >= self.tau) if score >= self.min_score else None
            row = {"file": name, "tau": round(self.tau, 3), "target_score": round(score, 4),
                   "x0": "", "y0": "", "x1": "", "y1": "", "error": ""}
            if box is not None:
                row.update(x0=float(box[0]), y0=float(box[1]), x1=float(box[2]), y1=float(box[3]))
                sy, sx = m.shape[0] / native[0], m.shape[1] / native[1]
                box = np.array([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy])  # drawn on the model-size image
            stem = str(name).replace("/", "__")
            os.makedirs(os.path.join(self.output_dir, "maps"), exist_ok=True)
            np.save(os.path.join(self.output_dir, "maps", stem + ".npy"), m.astype(np.float32))  # at the model's size
            if self.overlays:
                img = torch.as_tensor(sample["image"]).float().cpu()[0].numpy()
                boxes = [list(map(float, box))] if box is not None else []
                save_overlay(os.path.join(self.output_dir, "overlays", stem + ".png"),
                             img, m, boxes, title=f"target score {score:.2f}" + (f", box at {self.tau:.2f}" if boxes else ""))
            rows.append(row)
        self.table.add(rows)

    def _write(self, engine: Engine) -> None:
        if rank() != 0:
            return
        errors = [{"file": e.get("file", ""), "error": e.get("reason", "")} for e in self.set_aside or []]
        self.rows = self.table.finish(errors)
        logger.info("targetness: %d image(s), %d with an error -> %s", len(self.rows),
                    sum(1 for r in self.rows if r.get("error")), self.output_dir)
