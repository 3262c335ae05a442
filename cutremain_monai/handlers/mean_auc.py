"""Ignite key metric: mean one-vs-rest AUC-ROC over the classes that are defined on this evaluation set.

MONAI's ``ROCAUC`` handler averages per-class AUCs with a plain mean, so one class without positives in the
validation set (routine for rare ChestX-ray14 findings, or for a small binary validation split) turns the key
metric into NaN and the best checkpoint is never saved. This handler reuses MONAI's accumulation and DDP gathering
(``ROCAUCMetric`` + ``IgniteMetricHandler``) and only changes the aggregation: classes with one label value are left
out (:func:`cutremain_monai.metrics.classification.mean_auc`); when none is defined the metric is 0 with a warning,
so the first epoch's checkpoint is still kept.

Predictions ``(K,)`` per sample (probabilities); labels ``(K,)`` multi-hot or one-hot (multi-class: one-hot the
label in the evaluator's postprocessing) or ``(1,)`` binary.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch
from monai.handlers.ignite_metric import IgniteMetricHandler
from monai.metrics import ROCAUCMetric

from cutremain_monai.metrics.classification import mean_auc

__all__ = ["MeanAUC", "MeanAUCMetric"]

logger = logging.getLogger(__name__)


class MeanAUCMetric(ROCAUCMetric):
    """``ROCAUCMetric`` whose ``aggregate`` is the mean AUC over defined classes (see module doc)."""

    def aggregate(self, average=None):  # noqa: ARG002 - the averaging is fixed
        y_pred, y = self.get_buffer()
        if not isinstance(y_pred, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ValueError("y_pred and y must be PyTorch Tensor.")
        p = y_pred.detach().float().cpu().numpy().reshape(y_pred.shape[0], -1)
        t = y.detach().float().cpu().numpy().reshape(y.shape[0], -1)
        if p.shape != t.shape:
            raise ValueError(f"predictions {p.shape} and labels {t.shape} differ (one-hot multi-class labels)")
        value = mean_auc(t > 0.5, p)
        if not np.isfinite(value):
            warnings.warn("mean AUC undefined: no class has both labels in this evaluation set; reporting 0", stacklevel=2)
            return 0.0
        return value


class MeanAUC(IgniteMetricHandler):
    """Ignite handler for :class:`MeanAUCMetric` (use as ``key_val_metric``)."""

    def __init__(self, output_transform: Callable = lambda x: x, save_details: bool = False) -> None:
        super().__init__(metric_fn=MeanAUCMetric(), output_transform=output_transform, save_details=save_details)
