"""``PreciseBatchNorm``: BatchNorm running statistics computed again from the epoch's final weights before validation.

Why (issue 30, measured on the shortcut test): BatchNorm's running statistics are an exponential average (momentum
0.1, about the last ten steps) of the batch statistics the training forwards saw. Guided steps move the first
convolution fast (ISNet's LRP z^B rule depends on it directly: its weights change about 0.25% per step, the deeper
layers' about 0.01%), and the first convolution's outputs have a mean about 4.5 times their standard deviation,
so a small change of its weights moves the mean by a large share of the spread; behind a lagging first layer every
later one is off too, more with depth (at ``layer4`` the variance 3 times the running one). Training does not see this (train mode normalises
with the batch's own statistics), but every eval-mode use does: validation, the checkpoint chosen on it, testing
and inference. An ISNet model after 90 epochs predicted 1.00 for every image in eval mode (training-set AUC 0.51)
and AUC 0.79 on the same images with its statistics recomputed. Recomputing them ("precise BN", Wu and Johnson,
"Rethinking 'Batch' in BatchNorm", 2021) from a number of training batches with the weights fixed removes the lag.

What it adds to ``torch.optim.swa_utils.update_bn`` (the same cumulative average): the trainer's own batches
through its ``prepare_batch`` (dictionary batches, the networks' extra inputs), a budget of batches, autocast as
the trainer runs, the statistics averaged over DDP ranks (so every rank keeps the same model), and no change to a
network without BatchNorm. It only changes eval-mode behaviour: training forwards use the batch statistics, except
GAIN's erased-image forward, which runs in eval mode and so starts each epoch from statistics that match.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable

import torch
from ignite.engine import Engine, Events

__all__ = ["PreciseBatchNorm", "recompute_batchnorm_statistics"]

logger = logging.getLogger(__name__)


def _batchnorms(network: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in network.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


@torch.no_grad()
def recompute_batchnorm_statistics(network: torch.nn.Module, batches: Iterable, autocast: bool = False) -> int:
    """Set every BatchNorm's running mean and variance to the average of the batch statistics of ``batches``
    (each a tensor, or ``(x, args, kwargs)`` for ``network(x, *args, **kwargs)``) with the weights as they are;
    under DDP (initialised process group) averaged over the ranks. Returns the number of batches used; with none
    the statistics are left as they were. Modes and momenta are restored."""
    bns = _batchnorms(network)
    if not bns:
        return 0
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in bns]
    was_training = network.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    network.train()
    n = 0
    try:
        for batch in batches:
            x, args, kwargs = (batch, (), {}) if isinstance(batch, torch.Tensor) else batch
            ctx = torch.autocast(device_type=x.device.type) if autocast else contextlib.nullcontext()
            with ctx:
                network(x, *args, **(kwargs or {}))
            n += 1
    finally:
        for m, (mean, var, count, momentum) in zip(bns, saved):
            m.momentum = momentum
            if n == 0:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        network.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        for m in bns:  # (every rank takes the same number of batches: DistributedSampler gives equal shares)
            for buf in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(buf)
                buf.div_(world)
    return n


class PreciseBatchNorm:
    """At the trainer's ``EPOCH_COMPLETED`` (attach it before the ``ValidationHandler``, so validation, the
    checkpoints and the saved model see the result), recompute the network's BatchNorm statistics from the first
    ``num_batches`` batches of the training loader (``data_loader``, default the trainer's), prepared by the
    trainer's ``prepare_batch``. ``num_batches`` 0: off (the handler stays in the bundle's list, which has no
    ``_disabled_`` switches). See the module docstring for why."""

    def __init__(self, num_batches: int = 0, data_loader: Iterable | None = None):
        if num_batches is None or int(num_batches) < 0:
            raise ValueError(f"precise BatchNorm: num_batches must be 0 (off) or more, got {num_batches}")
        self.num_batches = int(num_batches)
        self.data_loader = data_loader

    def attach(self, engine: Engine) -> None:
        if self.num_batches and not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _batches(self, engine: Engine):
        loader = self.data_loader if self.data_loader is not None else engine.data_loader
        for data in itertools.islice(loader, self.num_batches):
            batch = engine.prepare_batch(data, engine.state.device, engine.non_blocking, **getattr(engine, "to_kwargs", {}))
            x = batch[0]
            x = x.as_tensor() if hasattr(x, "as_tensor") else x
            yield (x, tuple(batch[2]), dict(batch[3])) if len(batch) == 4 else x

    def __call__(self, engine: Engine) -> None:
        network = engine.network.module if isinstance(engine.network, torch.nn.parallel.DistributedDataParallel) else engine.network
        n = recompute_batchnorm_statistics(network, self._batches(engine), autocast=bool(getattr(engine, "amp", False)))
        if n:
            logger.info("epoch %d: BatchNorm statistics recomputed from %d training batches", engine.state.epoch, n)
