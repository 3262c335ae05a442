"""Trainer handler: PSL's online update of the pseudo-masks (seed 002's AE-PSL) on a schedule.

At the end of epoch ``start_epoch`` and every ``every`` epochs after it, the network (in eval mode) predicts the
class-weighted probabilities of each training image through the bundle's deterministic chain (no augmentation),
and :func:`~cutremain_monai.localization.pseudo_masks.refresh_labels` fills the ignored pixels of the image's
*initial* pseudo-mask where the prediction is confident; the result goes to the
:class:`~cutremain_monai.transforms.PseudoLabelBank` that the training chain reads
(:class:`~cutremain_monai.transforms.ApplyPseudoLabelsd`). ``engine.state.metrics["psl_labelled_share"]`` is the
share of the refreshed maps' pixels (the positive images: a negative image is background everywhere and never
refreshed) with a label after the refresh. Every rank refreshes the whole bank (ranks read different images),
through the bare module when the network is wrapped in DDP (no collective per image). An item that fails to read
here is skipped with a warning naming its file only (its initial map is used).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from cutremain_monai.constants import IGNORE_LABEL, IMAGE, LABEL, SEG_LABEL
from cutremain_monai.localization.pseudo_masks import refresh_labels

__all__ = ["RefreshPseudoLabels"]

logger = logging.getLogger(__name__)


class RefreshPseudoLabels:
    def __init__(self, network: torch.nn.Module, items: Sequence[dict], preprocessing, bank, start_epoch: int = 2,
                 every: int = 2, confidence: float = 0.9, enabled: bool = True, id_key: str = "image_path",
                 seg_key: str = SEG_LABEL, label_key: str = LABEL, image_key: str = IMAGE) -> None:
        if start_epoch < 1 or every < 1:
            raise ValueError(f"start_epoch and every must be >= 1, got {start_epoch}, {every}")
        if not 0 < confidence <= 1:
            raise ValueError(f"confidence must be in (0, 1], got {confidence}")
        self.network, self.items, self.preprocessing, self.bank = network, list(items), preprocessing, bank
        self.start_epoch, self.every, self.confidence, self.enabled = int(start_epoch), int(every), float(confidence), enabled
        self.id_key, self.seg_key, self.label_key, self.image_key = id_key, seg_key, label_key, image_key

    def attach(self, engine: Engine) -> None:
        if self.enabled and not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def due(self, epoch: int) -> bool:
        return self.enabled and epoch >= self.start_epoch and (epoch - self.start_epoch) % self.every == 0

    def __call__(self, engine: Engine) -> None:
        if not self.due(engine.state.epoch):
            return

        net = self.network.module if hasattr(self.network, "module") else self.network
        device = next(net.parameters()).device
        was_training = net.training
        net.eval()
        labelled = total = 0
        try:
            for item in self.items:
                y = np.asarray(torch.as_tensor(item.get(self.label_key, 0)).cpu(), dtype=float).reshape(-1)
                if not (y > 0.5).any():
                    continue  # no lesion in the image: its map is background everywhere, nothing to refresh
                try:
                    s = self.preprocessing(dict(item))
                except Exception as e:  # noqa: BLE001 (named and skipped; its initial map stays)
                    logger.warning("pseudo-mask refresh: %s skipped (%s)", os.path.basename(str(item.get(IMAGE))),
                                   type(e).__name__)
                    continue
                x = torch.as_tensor(s[self.image_key]).float()[None].to(device)
                with torch.no_grad():
                    probs = net(x)[0].float().cpu().numpy()
                initial = np.asarray(torch.as_tensor(s[self.seg_key]).cpu())[0].round().astype(np.uint8)
                label = np.asarray(torch.as_tensor(s[self.label_key]).cpu(), dtype=float).reshape(-1)
                new = refresh_labels(initial, probs, label, self.confidence)
                self.bank.update(s[self.id_key], new)
                labelled += int((new != IGNORE_LABEL).sum())
                total += new.size
        finally:
            net.train(was_training)
        self.bank.refreshes += 1
        share = labelled / total if total else float("nan")
        engine.state.metrics["psl_labelled_share"] = share
        logger.info("pseudo-masks refreshed after epoch %d (%d maps): %.3f of the pixels labelled",
                    engine.state.epoch, len(self.bank), share)
