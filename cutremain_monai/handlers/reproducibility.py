"""Reproducible and resumable training: per-epoch reseeding, a stop-after-N-epochs switch, the latest checkpoint,
and the best models' scores carried across a restart.

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

__all__ = ["BestModelState", "EpochSeed", "StopAfterEpochs", "latest_checkpoint"]


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


class BestModelState:
    """The key-metric ``CheckpointSaver``\ s' record of the models they kept (score and file), and the evaluator's
    best metric, as one object with ``state_dict`` / ``load_state_dict``: put it in the periodic checkpoint's
    ``save_dict`` and the resume ``CheckpointLoader``'s ``load_dict``.

    Without it a resumed run starts with empty savers: the first epoch after the restart is "the best so far" and
    overwrites ``model.pt`` (and the threshold chosen with it), even when an epoch before the kill scored better.
    MONAI's own route (``key_metric_save_state``) stores the record inside ``model.pt``, which then stops being a
    bare state dict (the model-zoo file the demo, MLflow and other tools load); this keeps it in the training
    checkpoint instead. Savers that keep no key-metric model are skipped.
    """

    def __init__(self, savers=(), evaluator=None):
        savers = savers if isinstance(savers, (list, tuple)) else [savers]
        self.trackers = [c for c in (getattr(s, "_key_metric_checkpoint", None) for s in savers) if c is not None]
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        # plain floats and strings: a checkpoint loads with torch.load(weights_only=True)
        state = {"savers": [{"_saved": [[float(p), str(f)] for p, f in c.state_dict()["_saved"]]} for c in self.trackers]}
        if self.evaluator is not None:
            state["best_metric"] = float(self.evaluator.state.best_metric)
            state["best_metric_epoch"] = int(self.evaluator.state.best_metric_epoch)
        return state

    def load_state_dict(self, state: dict) -> None:
        savers = state.get("savers", [])
        if len(savers) != len(self.trackers):
            raise ValueError(f"the checkpoint records {len(savers)} best-model saver(s), this run has {len(self.trackers)}: "
                             "it was written by another configuration (best_model_metric or the savers changed)")
        for tracker, saved in zip(self.trackers, savers):
            tracker.load_state_dict(saved)
        if self.evaluator is not None and "best_metric" in state:
            self.evaluator.state.best_metric = state["best_metric"]
            self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]


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
