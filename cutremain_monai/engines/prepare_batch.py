"""``prepare_batch`` for MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` that runs a batch-level augmentation.

MONAI's default ``prepare_batch`` moves ``image`` and ``label`` to the device; batch-level mixes (``SupMixupd``,
``SupCutmixd``) must run after collation and before that move, on the whole batch dict (they read ``box_mask``),
which is what this adds. Labels are cast to float and given a trailing class axis when ``label_shape`` asks for it
(BCE on binary targets wants ``(B, 1)``).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import PrepareBatch

from cutremain_monai.constants import IMAGE, LABEL

__all__ = ["BoxBatchPrepare"]


class BoxBatchPrepare(PrepareBatch):
    """Args:
        batch_transform: a callable on the collated batch dict (e.g. ``SupCutmixd``), or None.
        label_mode: ``"binary"`` -> float ``(B, 1)``; ``"multilabel"`` -> float ``(B, K)``; ``"multiclass"`` -> long
            ``(B,)`` class indices (one-hot/mixed float targets pass through as float ``(B, K)``).
        num_classes: multi-class only: with a ``batch_transform``, class indices are one-hot encoded to float
            ``(B, K)`` first, so a mix of two samples yields class probabilities (which ``CrossEntropyLoss`` takes)
            rather than an averaged class index.
        channels_last: images leave in ``torch.channels_last`` memory layout (with a channels-last network: the
            faster convolutions of tensor-core GPUs under mixed precision).
    """

    def __init__(self, batch_transform=None, label_mode: str = "binary", image_key: str = IMAGE, label_key: str = LABEL,
                 num_classes: int | None = None, channels_last: bool = False):
        if label_mode not in ("binary", "multilabel", "multiclass"):
            raise ValueError(f"label_mode must be binary, multilabel or multiclass, got {label_mode!r}")
        self.batch_transform = batch_transform
        self.label_mode = label_mode
        self.image_key = image_key
        self.label_key = label_key
        self.num_classes = num_classes
        self.channels_last = channels_last
        if label_mode == "multiclass" and batch_transform is not None and not num_classes:
            raise ValueError("label_mode 'multiclass' with a batch_transform needs num_classes (labels are one-hot encoded before mixing)")

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs: Any):
        d = self.prepare(batchdata, device, non_blocking, **kwargs)
        return d[self.image_key], d[self.label_key]

    def prepare(self, batchdata: dict, device=None, non_blocking: bool = False, mask_key: str | None = None,
                **kwargs: Any) -> dict:
        """``{image_key: image, label_key: label (or None), "mask": mask (or None)}`` on ``device``: the same image and
        label as ``__call__``, and with ``mask_key`` the batch's mask after the batch transform (guided training
        reads the box or lung masks of exactly the images it trains on)."""
        if self.label_key in batchdata:
            batchdata = {**batchdata, self.label_key: _label_tensor(batchdata[self.label_key])}
        if self.batch_transform is not None and self.label_key in batchdata:
            if self.label_mode == "multiclass":
                y = torch.as_tensor(batchdata[self.label_key])
                if not y.is_floating_point():
                    batchdata = {**batchdata, self.label_key: torch.nn.functional.one_hot(y.long().reshape(-1), self.num_classes).float()}
            batchdata = self.batch_transform(batchdata)
        image = torch.as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        if self.channels_last and image.ndim == 4:
            image = image.contiguous(memory_format=torch.channels_last)
        mask = batchdata.get(mask_key) if mask_key else None
        if mask is not None:
            mask = torch.as_tensor(mask).to(device=device, non_blocking=non_blocking, **kwargs)
        out = {self.image_key: image, self.label_key: None, "mask": mask}
        if self.label_key not in batchdata:
            return out
        label = torch.as_tensor(batchdata[self.label_key])
        if self.label_mode == "binary":
            label = label.float().reshape(-1, 1)
        elif self.label_mode == "multilabel":
            label = label.float().reshape(label.shape[0], -1)
        elif not label.is_floating_point():
            label = label.long().reshape(-1)
        out[self.label_key] = label.to(device=device, non_blocking=non_blocking, **kwargs)
        return out


def _label_tensor(label) -> torch.Tensor:
    """Collated labels as one tensor: PyTorch's default collate turns per-sample label lists (multi-label vectors
    stored as JSON lists) into a list of K tensors of shape ``(B,)``; those are stacked to ``(B, K)``."""
    if isinstance(label, (list, tuple)) and label and isinstance(label[0], torch.Tensor) and label[0].ndim == 1:
        return torch.stack([torch.as_tensor(v) for v in label], dim=1)
    return torch.as_tensor(label)
