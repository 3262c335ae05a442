"""Reproducible and resumable training: per-epoch reseeding, a stop-after-N-epochs switch, the latest checkpoint,
and the best models' scores carried across a restart.

A seeded run seeds once at the start, so after a restart from a checkpoint its random streams differ from an
uninterrupted run's. ``EpochSeed`` reseeds torch, numpy and the given MONAI transforms at every epoch start from
``(seed, epoch, rank)``: a run resumed at epoch ``k`` draws exactly what the uninterrupted run drew in epoch ``k``
(the distributed sampler's order already depends only on ``(seed, epoch)``).
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointLoader

from cutremain_monai.handlers.utils import key_metric_trackers, rank

logger = logging.getLogger(__name__)

__all__ = ["BestModelState", "EpochSeed", "ResumeCheckpointLoader", "StopAfterEpochs", "latest_checkpoint"]


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
    ``save_dict`` and, as an optional key, in the resume :class:`ResumeCheckpointLoader`'s ``load_dict``.

    Without it a resumed run starts with empty savers: the first epoch after the restart is "the best so far" and
    overwrites ``model.pt`` (and the threshold chosen with it), even when an epoch before the kill scored better.
    MONAI's own route (``key_metric_save_state``) stores the record inside ``model.pt``, which then stops being a
    bare state dict (the model-zoo file the demo, MLflow and other tools load); this keeps it in the training
    checkpoint instead. Savers that keep no key-metric model are skipped.

    A record is matched to its saver by the file it keeps (``model.pt``, ``model_val_loss.pt``...; the second
    file's name says which rule the first follows). When the files differ (the run was resumed with another
    ``best_model_metric``), the savers start empty, as before this record existed; a record whose file is gone
    (deleted, or a kill between removing the old best and writing the new) is dropped. Both with a warning.
    """

    def __init__(self, savers=(), evaluator=None):
        self.trackers = key_metric_trackers(savers)
        self.evaluator = evaluator

    @staticmethod
    def _file(tracker, recorded: str | None = None) -> str | None:
        """The file a tracker keeps: its fixed name (MONAI's ``key_metric_filename``) or the one it recorded."""
        return getattr(tracker.save_handler, "filename", None) or recorded

    def state_dict(self) -> dict:
        # plain floats and strings: a checkpoint loads with torch.load(weights_only=True)
        state = {"savers": [{"file": self._file(c), "_saved": [[float(p), str(f)] for p, f in c.state_dict()["_saved"]]}
                            for c in self.trackers]}
        if self.evaluator is not None:
            state["best_metric"] = float(self.evaluator.state.best_metric)
            state["best_metric_epoch"] = int(self.evaluator.state.best_metric_epoch)
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("savers", [])
        before, now = [s.get("file") for s in saved], [self._file(c) for c in self.trackers]
        if before != now:
            logger.warning("resume: the checkpoint's best-model record is for %s, this run keeps %s (another "
                           "best_model_metric?): the best models are chosen again from this epoch on", before, now)
            return
        for tracker, record in zip(self.trackers, saved):
            items = [(p, f) for p, f in record["_saved"]
                     if os.path.exists(os.path.join(str(tracker.save_handler.dirname), self._file(tracker, f)))]
            if len(items) < len(record["_saved"]):
                logger.warning("resume: %s recorded as the best model is not in %s: chosen again from this epoch on",
                               self._file(tracker), tracker.save_handler.dirname)
            tracker.load_state_dict({"_saved": items})
        if self.evaluator is not None and "best_metric" in state:
            self.evaluator.state.best_metric = state["best_metric"]
            self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` (same arguments; shapes always strict) that leaves out the ``optional`` keys of
    ``load_dict`` a checkpoint does not have, with a warning, instead of failing after part of the state was
    loaded (ignite checks the keys one by one): a run checkpointed before a key was added (``best_models``) still
    resumes. The rest is MONAI's ``__call__``: one read of the file, ``Checkpoint.load_objects``, ``max_epochs``
    kept from the config."""

    def __init__(self, *args, optional: Sequence[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        if not self.strict_shape:
            raise ValueError("ResumeCheckpointLoader loads whole checkpoints (strict_shape True); use MONAI's "
                             "CheckpointLoader to load weights of other shapes")
        self.optional = set(optional)

    def __call__(self, engine: Engine) -> None:
        checkpoint = torch.load(self.load_path, map_location=self.map_location, weights_only=True)
        missing = sorted(k for k in self.optional if k in self.load_dict and k not in checkpoint)
        if missing:
            logger.warning("resume: %s has no %s (written before they were saved): left as they start",
                           self.load_path, ", ".join(missing))
        load_dict = {k: v for k, v in self.load_dict.items() if k not in missing}
        prior_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=load_dict, checkpoint=checkpoint, strict=self.strict)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(f"{self.load_path}: its epoch count ({engine.state.epoch}) is larger than max_epochs "
                             f"({prior_max_epochs}); give more epochs to train on from it")
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {self.load_path}")


def _checkpoint_epoch(path: str) -> int:
    m = re.search(r"=(\d+)\.pt$", path)
    return int(m.group(1)) if m else -1


def last_checkpoints(ckpt_dir: str, n: int = 3, pattern: str = "checkpoint_epoch=*.pt") -> list[str]:
    """The ``n`` checkpoints with the highest epoch numbers in ``ckpt_dir``, oldest first (empty when none)."""
    return sorted(glob.glob(os.path.join(ckpt_dir, pattern)), key=_checkpoint_epoch)[-n:] if n > 0 else []


def latest_checkpoint(ckpt_dir: str, pattern: str = "checkpoint_epoch=*.pt") -> str | None:
    """The checkpoint with the highest epoch number in ``ckpt_dir`` (MONAI ``CheckpointSaver`` names), or None."""
    last = last_checkpoints(ckpt_dir, 1, pattern)
    return last[0] if last else None
