"""Trainer/evaluator plumbing of the COVID severity model for MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``.

``SeverityPrepareBatch`` hands ``(image, zone labels, (lung_mask, zones), {})`` to the engine, which MONAI turns
into ``network(image, lung_mask, zones)`` (its 4-tuple ``prepare_batch`` form); ``ZoneBCELoss`` is the paper's
binary cross-entropy between the six pooled zone probabilities and the binarised zone labels, computed in float32
(BCE on probabilities is not autocast-safe, so AMP runs stay correct on GPUs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.engines.utils import PrepareBatch
from torch import nn

__all__ = ["SeverityPrepareBatch", "ZoneBCELoss"]


class SeverityPrepareBatch(PrepareBatch):
    """Args: image / mask / zone / label keys of the collated batch. Labels are the six zone scores, binarised here
    (score > 0 -> 1, as the paper does), so raw 0-3 Brixia scores and already binarised ones both work."""

    def __init__(self, image_key: str = "image", mask_key: str = "lung_mask", zones_key: str = "zones",
                 label_key: str = "zone_scores"):
        self.image_key, self.mask_key, self.zones_key, self.label_key = image_key, mask_key, zones_key, label_key

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs: Any):
        def to(x, dtype=None):
            t = torch.as_tensor(x)
            return t.to(device=device, non_blocking=non_blocking, dtype=dtype)

        image = to(batchdata[self.image_key], torch.float32)
        mask = to(batchdata[self.mask_key], torch.float32)
        zones = torch.as_tensor(batchdata[self.zones_key])
        if zones.is_floating_point():  # a zone map that went through float transforms: 2.9999 is zone 3
            zones = zones.round()
        zones = to(zones, torch.uint8)  # uint8: what LungZonesd makes (zones 0..6)
        label = batchdata.get(self.label_key)
        if label is not None:
            if isinstance(label, (list, tuple)):  # default collate of per-sample lists: 6 tensors of (B,)
                label = torch.stack([torch.as_tensor(v) for v in label], dim=1)
            label = (to(label, torch.float32).reshape(image.shape[0], -1) > 0).float()  # Brixia 1-3 -> 1, 0 stays 0
        return image, label, (mask, zones), {}


class ZoneBCELoss(nn.Module):
    """Mean binary cross-entropy between zone probabilities ``(B, 6)`` and zone labels ``(B, 6)``, in float32."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if isinstance(prob, (tuple, list)):  # a network built with return_map=True
            prob = prob[0]
        with torch.autocast(device_type=prob.device.type, enabled=False):
            p = prob.float().clamp(self.eps, 1 - self.eps)
            return F.binary_cross_entropy(p, target.float().reshape(p.shape))
