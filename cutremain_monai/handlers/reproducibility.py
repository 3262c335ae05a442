"""Reproducible and resumable training: per-epoch reseeding, a stop-after-N-epochs switch, the latest checkpoint.

A seeded run seeds once at the start, so after a restart from a checkpoint its random streams differ from an
uninterrupted run's. ``EpochSeed`` reseeds torch, numpy and the given MONAI transforms at every epoch start from
``(seed, epoch, rank)``: a run resumed at epoch ``k`` draws exactly what the uninterrupted run drew in epoch ``k``
(the distributed sampler's order already depends only on ``(seed, epoch)``).
"""

from __future__ import annotations

import glob
import os
import random
import re

import numpy as np
import torch
from ignite.engine import Engine, Events

from cutremain_monai.handlers.utils import rank

__all__ = ["EpochSeed", "StopAfterEpochs", "latest_checkpoint"]


class EpochSeed:
    """Reseed at ``EPOCH_STARTED`` from ``seed + 1000 * epoch + rank``; ``transforms`` get ``set_random_state``."""

    def __init__(self, seed: int = 0, transforms=()):
        self.seed = int(seed)
        self.transforms = [t for t in (transforms if isinstance(transforms, (list, tuple)) else [transforms]) if t is not None]

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        s = self.seed + 1000 * int(engine.state.epoch) + rank()
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
        for t in self.transforms:
            if hasattr(t, "set_random_state"):
                t.set_random_state(seed=s % 2**32)


class StopAfterEpochs:
    """Terminate the trainer after ``epochs`` completed epochs (a time-boxed run; the resume test's "kill")."""

    def __init__(self, epochs: int | None = None):
        self.epochs = epochs

    def attach(self, engine: Engine) -> None:
        if self.epochs and not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.epochs and engine.state.epoch >= self.epochs:
            engine.terminate()


def last_checkpoints(ckpt_dir: str, n: int = 3, pattern: str = "checkpoint_epoch=*.pt") -> list[str]:
    """The ``n`` checkpoints with the highest epoch numbers in ``ckpt_dir``, oldest first (empty when none)."""
    def epoch(f):
        m = re.search(r"=(\d+)\.pt$", f)
        return int(m.group(1)) if m else -1
    return sorted(glob.glob(os.path.join(ckpt_dir, pattern)), key=epoch)[-n:] if n > 0 else []


def latest_checkpoint(ckpt_dir: str, pattern: str = "checkpoint_epoch=*.pt") -> str | None:
    """The checkpoint with the highest epoch number in ``ckpt_dir`` (MONAI ``CheckpointSaver`` names), or None."""
    files = glob.glob(os.path.join(ckpt_dir, pattern))
    if not files:
        return None
    def epoch(f):
        m = re.search(r"=(\d+)\.pt$", f)
        return int(m.group(1)) if m else -1
    return max(files, key=epoch)
