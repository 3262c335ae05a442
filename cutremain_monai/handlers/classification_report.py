"""Evaluator handler: AUC-ROC, F1 and accuracy over the whole (distributed) evaluation set, the F1 threshold
protocol, and the ROC curve as a PNG; binary, multi-class (per-class one-vs-rest AUC / F1, the paper's Table 3)
and multi-label (per-class AUC, mAP, CF1, OF1, Tables 4-5) by ``mode``.

MONAI's ``ROCAUC`` handler gives the AUC; this adds F1 and accuracy at a threshold chosen on validation (saved as
``threshold.json`` whenever validation AUC improves, the same epoch the best checkpoint is kept) and applied
unchanged on the test set (``threshold_file``), with the predictions gathered across DDP ranks. Rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from ignite.engine import Engine, Events

from cutremain_monai.handlers.utils import gather_all, key_metric_trackers, rank
from cutremain_monai.metrics.classification import (binary_metrics, multiclass_metrics, multilabel_metrics,
                                                    roc_points, THRESHOLD_RULES)

__all__ = ["ClassificationReport"]

logger = logging.getLogger(__name__)


class ClassificationReport:
    """Args:
        output_dir: where ``{prefix}_metrics.json``, ``{prefix}_roc.png`` and ``threshold.json`` go.
        prefix: metric name prefix (``val`` / ``test``).
        threshold: a fixed threshold; ``threshold_file``: read it from there; neither: choose it on this data.
        pred_key / label_key: keys in the (decollated) engine output; predictions are probabilities.
        mode: ``binary`` | ``multiclass`` (softmax probabilities, class-index or one-hot labels; no threshold) |
            ``multilabel`` (one threshold per class, saved as a list).
        class_names: names for the per-class entries (multi-class / multi-label).
        threshold_rule / target_sensitivity: how the threshold is chosen on this data (``f1``, ``youden`` or
            ``sensitivity``; :func:`~cutremain_monai.metrics.classification.choose_threshold`).
        model_saver: the ``CheckpointSaver`` of ``model.pt``, attached before this report: ``threshold.json`` and the
            ROC are written in the epochs it saves (whatever its metric: guided runs keep the lowest validation
            loss), so the test threshold is chosen on ``model.pt``'s own epoch. None: in the epochs of a new best AUC.
    """
    def __init__(self, output_dir: str, prefix: str = "val", threshold=None, threshold_file: str | None = None,
                 pred_key: str = "pred", label_key: str = "label", save_roc: bool = True, mode: str = "binary",
                 class_names=None, threshold_rule: str = "f1", target_sensitivity: float = 0.9, model_saver=None):
        if threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, got {threshold_rule!r}")
        self.rule, self.target_sensitivity = threshold_rule, float(target_sensitivity)
        if mode not in ("binary", "multiclass", "multilabel"):
            raise ValueError(f"mode must be binary, multiclass or multilabel, got {mode!r}")
        self.mode = mode
        self.class_names = list(class_names) if class_names is not None else None
        self.output_dir = output_dir
        self.prefix = prefix
        self.threshold = threshold
        self.threshold_file = threshold_file
        self.pred_key, self.label_key = pred_key, label_key
        self.save_roc = save_roc
        self.best_auc = -np.inf
        self.model_saver = model_saver
        self._saved_item = None  # the (score, file) the saver kept when this evaluation started
        self._preds: list = []
        self._labels: list = []

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self._reset, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        if not engine.has_event_handler(self._collect, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        if not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._preds, self._labels = [], []
        self._saved_item = self._kept()

    def _kept(self):
        """The ``(score, file)`` of the model ``model_saver`` keeps (its best; ``model.pt`` is one file), compared by
        value: a resumed run's saver holds the same record, rebuilt from the checkpoint. None without one."""
        trackers = key_metric_trackers(self.model_saver) if self.model_saver is not None else []
        return trackers[0]._saved[-1] if trackers and trackers[0]._saved else None

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        items = out if isinstance(out, list) else [out]
        for o in items:
            p = torch.as_tensor(o[self.pred_key]).detach().float().reshape(1, -1).cpu()
            y = torch.as_tensor(o[self.label_key]).detach().float().reshape(1, -1).cpu()
            if self.mode == "multiclass" and y.shape[1] == 1 and p.shape[1] > 1:  # class index -> one-hot
                y = torch.nn.functional.one_hot(y.long().reshape(-1), p.shape[1]).float()
            self._preds.append(p)
            self._labels.append(y)

    def _fixed_threshold(self):
        if self.threshold is not None:
            return self.threshold if isinstance(self.threshold, (list, tuple)) else float(self.threshold)
        if self.threshold_file:
            if not os.path.exists(self.threshold_file):
                raise FileNotFoundError(f"threshold file {self.threshold_file} not found: train (with validation) first")
            with open(self.threshold_file) as f:
                saved = json.load(f)
            return saved["thresholds"] if self.mode == "multilabel" else float(saved["threshold"])
        return None

    def _metrics(self, labels: torch.Tensor, preds: torch.Tensor) -> dict:
        if self.mode == "binary":
            return binary_metrics(labels.numpy().reshape(-1), preds.numpy().reshape(-1), self._fixed_threshold(),
                                  self.rule, self.target_sensitivity)
        if self.mode == "multiclass":
            return multiclass_metrics(labels.numpy(), preds.numpy(), self.class_names)
        return multilabel_metrics(labels.numpy() > 0.5, preds.numpy(), self.class_names, self._fixed_threshold(),
                                  self.rule, self.target_sensitivity)

    def __call__(self, engine: Engine) -> None:
        preds = gather_all(torch.cat(self._preds)) if self._preds else torch.zeros(0, 1)
        labels = gather_all(torch.cat(self._labels)) if self._labels else torch.zeros(0, 1)
        if len(labels) == 0:
            return
        y, p = labels.numpy(), preds.numpy()
        m = self._metrics(labels, preds)
        for k in ("auc", "f1", "accuracy", "sensitivity", "specificity", "threshold", "map", "cf1", "of1"):
            if k in m:
                engine.state.metrics[f"{self.prefix}_{k}"] = m[k]
        if rank() != 0:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, f"{self.prefix}_metrics.json"), "w") as f:
            json.dump(m, f, indent=1)
        if self.model_saver is not None:  # model.pt was written in this epoch: a new checkpoint item
            kept = self._kept()
            improved = kept is not None and kept != self._saved_item
        else:  # no saver: the epochs of a new best AUC
            improved = np.isfinite(m["auc"]) and m["auc"] > self.best_auc
            self.best_auc = m["auc"] if improved else self.best_auc
        if improved:
            if self.threshold is None and self.threshold_file is None and self.mode != "multiclass":
                chosen = {"thresholds": m["thresholds"]} if self.mode == "multilabel" else {"threshold": m["threshold"]}
                with open(os.path.join(self.output_dir, "threshold.json"), "w") as f:
                    json.dump({**chosen, "rule": self.rule, "chosen_on": self.prefix, "epoch": getattr(engine.state, "epoch", None), "auc": m["auc"]}, f)
            if self.save_roc and np.isfinite(m["auc"]):
                self._plot(y, p, m)

    def _plot(self, y, p, m) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4) if self.mode == "binary" else (6, 5), dpi=100)
        if self.mode == "binary":
            fpr, tpr = roc_points(y, p)
            ax.plot(fpr, tpr, label=f"AUC {m['auc']:.3f}")
        else:
            y2 = y.reshape(len(y), -1) > 0.5
            for c, (name, v) in enumerate(m["per_class"].items()):
                if np.isfinite(v["auc"]):
                    fpr, tpr = roc_points(y2[:, c], p.reshape(len(p), -1)[:, c])
                    ax.plot(fpr, tpr, lw=1, label=f"{name} {v['auc']:.2f}")
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC ({self.prefix}, n={m['n']})")
        ax.legend(loc="lower right", fontsize=6 if self.mode != "binary" else None)
        fig.tight_layout()
        fig.savefig(os.path.join(self.output_dir, f"{self.prefix}_roc.png"))
        plt.close(fig)
