"""The training step of the lesion-segmentation bundle (PSL, optionally with SEC's losses), as a MONAI
``SupervisedTrainer`` ``iteration_update``.

One step: ``(pixel scores, class logits) = network(image, return_parts=True)``; the class-weighted
log-probabilities (:func:`~cutremain_monai.networks.psl.class_weighted_log_probs`) with the weights taken from the
classification head **detached** by default (the head learns from the image labels only; the pixel loss cannot
lower a present class's probability to make its background easier), then
:class:`~cutremain_monai.engines.psl_losses.PSLLoss` on the batch's ``seg_label`` (pseudo-mask), ``label`` and
``image``. AMP through the trainer's scaler; the network may be wrapped in DDP (``return_parts`` goes through
``forward``). The step's terms are in ``engine.state.output`` and their epoch means in ``engine.state.metrics``
(``psl_seed``, ``psl_cls``, ``psl_expand``, ``psl_constrain``).

What this adds to MONAI's ``SupervisedTrainer``: a step with two targets (pixel and image labels) and the image
itself (for the constrain term); the trainer's own step takes one target.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from cutremain_monai.constants import IMAGE, LABEL, SEG_LABEL
from cutremain_monai.engines.psl_losses import PSLLoss
from cutremain_monai.networks.psl import class_weighted_log_probs

__all__ = ["PSLStep"]

logger = logging.getLogger(__name__)


def _tensor(x, device):
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.to(device)


class PSLStep:
    """``iteration_update`` of the PSL trainer (module doc). ``num_classes``: foreground classes ``C``."""

    def __init__(self, loss: PSLLoss, num_classes: int = 1, detach_class_weights: bool = True,
                 image_key: str = IMAGE, seg_key: str = SEG_LABEL, label_key: str = LABEL) -> None:
        self.loss, self.num_classes, self.detach = loss, int(num_classes), bool(detach_class_weights)
        self.image_key, self.seg_key, self.label_key = image_key, seg_key, label_key
        self._sums: dict[str, list[float]] = {}
        self._epoch = None

    def __call__(self, engine: Engine, batchdata: dict) -> dict:
        if engine.state.epoch != self._epoch:  # the epoch means start again
            self._sums, self._epoch = {}, engine.state.epoch
        device = engine.state.device
        for key in (self.image_key, self.seg_key, self.label_key):
            if key not in batchdata:
                raise KeyError(f"the PSL step needs '{key}' in every batch (have {sorted(batchdata)})")
        x = _tensor(batchdata[self.image_key], device).float()
        seg = _tensor(batchdata[self.seg_key], device)
        seg = (seg[:, 0] if seg.ndim == 4 else seg).round().long()
        y = _tensor(batchdata[self.label_key], device).float().reshape(x.shape[0], -1)
        if y.shape[1] != self.num_classes:
            raise ValueError(f"labels are {tuple(y.shape)} but the network has {self.num_classes} class(es)")
        network = engine.network
        network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = bool(engine.amp and engine.scaler is not None)
        with torch.autocast("cuda", **engine.amp_kwargs) if use_amp else contextlib.nullcontext():
            seg_logits, class_logits = network(x, return_parts=True)
        log_probs = class_weighted_log_probs(seg_logits.float(), class_logits.detach() if self.detach else class_logits)
        loss, terms = self.loss(log_probs, class_logits, seg, y, x)
        if not torch.isfinite(loss):
            values = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in terms.items())
            raise FloatingPointError(f"PSL loss is not finite at epoch {engine.state.epoch}, iteration "
                                     f"{engine.state.iteration} ({values}); check the images or lower the learning rate")
        engine.state.output = {Keys.IMAGE: x, Keys.LABEL: y, Keys.PRED: class_logits.detach(), Keys.LOSS: loss}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if use_amp:
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.state.output[Keys.LOSS] = loss.detach()
        for k, v in terms.items():
            value = float(v.detach())
            engine.state.output[k] = value
            acc = self._sums.setdefault(k, [0.0, 0])
            acc[0] += value
            acc[1] += 1
            engine.state.metrics[f"psl_{k}"] = acc[0] / acc[1]
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
