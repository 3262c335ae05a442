"""Validation AUC with the background swapped: a checkpoint rule that a shortcut outside the guidance mask does not
reward.

A validation section that carries the training set's shortcut (a burned-in tag, a marker, a device) rewards a
model for reading it: validation AUC goes up, and so can a guided run's validation loss, since ISNet's heatmap loss
can be satisfied by a small relevance on the tag that still decides the logit (clavicle docs, "The run that
decides": the lowest validation loss picked a model reading the tag with AUC 0.83). This metric asks the question
the guidance is for: does the prediction still hold when everything outside the mask comes from another image?

Each validation image keeps its pixels inside its own mask and its partner's mask; every other pixel is replaced by
the partner's. The partner is an image with another label (the "mixed-next" test of Xiao et al., *Noise or Signal:
The Role of Image Backgrounds in Object Recognition*, ICLR 2021): a model that reads the foreground keeps its AUC,
one that reads the background follows the partner's label and falls below 0.5. ``val_auc_swap`` is the mean AUC
(:func:`~cutremain_monai.metrics.classification.mean_auc`) of those composites against their own labels.

Partners come from the same batch or, when the batch has no image with another label (validation sections are not
shuffled and are often sorted), from the most recent earlier images of the epoch (a bank of ``bank_size`` kept on
the device; it carries over to the next epoch, whose images are the same, so only the first epoch's first batches
can lack one). An image without any other-label partner is paired with the nearest other image; an image without a
mask, or a batch of one image with an empty bank, is left out. The composites run through the network in eval mode
without gradients (MONAI's evaluator fires its iteration events outside its own eval-mode context).

What it adds to MONAI and Ignite: they have no counterfactual validation metric; this is one handler that runs one
extra forward per validation batch and gathers the scores over DDP ranks.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from cutremain_monai.handlers.utils import gather_all
from cutremain_monai.metrics.classification import mean_auc

__all__ = ["swap_background", "BackgroundSwapAUC"]

logger = logging.getLogger(__name__)


def _label_rows(y: torch.Tensor, label_mode: str, num_classes: int | None = None) -> torch.Tensor:
    """Labels as ``(B, K)`` float rows (binary ``(B,)``/``(B, 1)``; multi-class index -> one-hot)."""
    y = torch.as_tensor(y)
    if label_mode == "multiclass":
        idx = y.reshape(y.shape[0], -1)[:, 0].long() if y.ndim > 1 and y.shape[-1] == 1 else y
        if idx.ndim == 1:
            k = int(num_classes or (int(idx.max()) + 1 if idx.numel() else 1))
            return torch.nn.functional.one_hot(idx.long(), k).float()
        return idx.float()
    return y.reshape(y.shape[0], -1).float()


def swap_background(x: torch.Tensor, mask: torch.Tensor, partner_x: torch.Tensor, partner_mask: torch.Tensor) -> torch.Tensor:
    """``x`` inside ``mask`` or ``partner_mask``, ``partner_x`` everywhere else (all ``(B, C, H, W)`` / ``(B, 1, H, W)``).
    Keeping the partner's mask area from ``x`` too means the partner's foreground (its lesion) never enters."""
    keep = (mask > 0.5) | (partner_mask > 0.5)
    return torch.where(keep, x, partner_x)


class BackgroundSwapAUC:
    """``engine.state.metrics[name]``: validation AUC on background-swapped composites (module doc), at the
    evaluator's ``EPOCH_COMPLETED``; attach it before the ``CheckpointSaver`` that reads it.

    Args:
        guided: the run's :class:`~cutremain_monai.engines.guided_training.GuidedTraining` (its batch preparation
            and masks, so the composites use the guidance's own mask; also for ``guidance="none"``).
        num_classes: multi-class only: the one-hot width.
        name: the metric's name.
        bank_size: earlier images kept as partners (module doc).
        enabled: False attaches nothing (a bundle switch in a handler list that must not change length).
    """

    def __init__(self, guided, num_classes: int | None = None, name: str = "val_auc_swap", bank_size: int = 16,
                 enabled: bool = True):
        self.enabled = bool(enabled)
        self.guided = guided
        self.num_classes = num_classes
        self.name = name
        self.bank_size = int(bank_size)
        self._bank: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (image, mask, label row), newest last
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.paired_other = 0  # composites of the last epoch whose partner had another label
        self.paired_same = 0

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _reset(self, engine: Engine) -> None:
        self._scores, self._labels = [], []
        self.paired_other = self.paired_same = 0

    def partners(self, x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor):
        """``(partner images, partner masks, chosen (B,) bool, other label (B,) bool)``: for each image, the next
        image of the batch (cyclically) with another label, else the newest one in the bank with another label,
        else the next image of the batch (or the newest in the bank)."""
        b = x.shape[0]
        px, pm = torch.zeros_like(x), torch.zeros_like(mask)
        chosen = torch.zeros(b, dtype=torch.bool, device=x.device)
        other = torch.zeros(b, dtype=torch.bool, device=x.device)
        for i in range(b):
            pick = None
            for k in range(1, b):
                j = (i + k) % b
                if not torch.equal(rows[j], rows[i]):
                    pick, other[i] = (x[j], mask[j]), True
                    break
            if pick is None:
                for bx, bm, br in reversed(self._bank):
                    if not torch.equal(br, rows[i]):
                        pick, other[i] = (bx, bm), True
                        break
            if pick is None and b > 1:
                j = (i + 1) % b
                pick = (x[j], mask[j])
            if pick is None and self._bank:
                pick = self._bank[-1][:2]
            if pick is not None:
                px[i], pm[i] = pick
                chosen[i] = True
        return px, pm, chosen, other

    def _iteration(self, engine: Engine) -> None:
        x, y, mask, has_mask, args, kwargs = self.guided.batch_with_masks(engine, engine.state.batch)
        rows = _label_rows(y, self.guided.label_mode, self.num_classes).to(x.device)
        px, pm, chosen, other = self.partners(x, mask, rows)
        # the bank: the newest images with a mask (only those that can stay in it are copied)
        for i in has_mask.nonzero().flatten()[-self.bank_size:].tolist():
            self._bank.append((x[i].detach().clone(), mask[i].detach().clone(), rows[i].detach().clone()))
        del self._bank[:-self.bank_size]
        use = chosen & has_mask
        if not bool(use.any()):
            return
        self.paired_other += int((other & use).sum())
        self.paired_same += int((~other & use).sum())
        composite = swap_background(x[use], mask[use], px[use], pm[use])
        network = getattr(engine.network, "module", engine.network)  # (no DDP buffer broadcast for this forward)
        was_training = network.training
        network.eval()
        try:
            with torch.no_grad():
                out = network(composite, *(a[use] if torch.is_tensor(a) else a for a in args), **kwargs)
        finally:
            network.train(was_training)
        out = out.float().reshape(out.shape[0], -1)
        if self.guided.label_mode == "multiclass":
            out = torch.softmax(out, dim=1)  # (binary and multi-label: AUC is the same on logits and sigmoids)
        self._scores.append(out.detach())
        self._labels.append(rows[use].detach())

    def _completed(self, engine: Engine) -> None:
        width = self._labels[0].shape[1] if self._labels else int(self.num_classes or 1)  # (a rank without any)
        device = engine.state.device if isinstance(engine.state.device, torch.device) else torch.device("cpu")
        scores = torch.cat(self._scores) if self._scores else torch.zeros((0, width), device=device)
        labels = torch.cat(self._labels) if self._labels else torch.zeros((0, width), device=device)
        scores, labels = gather_all(scores.to(device)), gather_all(labels.to(device))
        p, t = scores.cpu().numpy(), labels.cpu().numpy()
        value = mean_auc(t > 0.5, p) if len(p) else float("nan")
        if not np.isfinite(value):
            logger.warning("%s undefined (no class with both labels among %d composites): reporting 0", self.name, len(p))
            value = 0.0
        engine.state.metrics[self.name] = float(value)
        if self.paired_same:
            logger.info("%s: %d of %d composites have a partner with the same label (no other label nearby)",
                        self.name, self.paired_same, self.paired_same + self.paired_other)
