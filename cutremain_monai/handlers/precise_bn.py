"""``PreciseBatchNorm``: BatchNorm running statistics computed again from the epoch's final weights before validation.

Why (issue 30, measured on the shortcut test): BatchNorm's running statistics are an exponential average (momentum
0.1, about the last ten steps) of the batch statistics the training forwards saw. Guided steps move the first
convolution fast (ISNet's LRP z^B rule depends on it directly: its weights changed 10.5% over 40 steps, the deeper
convolutions' 0.2-0.8%), and the first convolution's outputs have a mean 4.7 times their standard deviation,
so a small change of its weights moves the mean by a large share of the spread; behind a lagging first layer every
later one is off too, more with depth (at ``layer4`` the variance 3 times the running one). Training does not see this (train mode normalises
with the batch's own statistics), but every eval-mode use does: validation, the checkpoint chosen on it, testing
and inference. An ISNet model after 90 epochs predicted 1.00 for every image in eval mode (training-set AUC 0.51)
and AUC 0.79 on the same images with its statistics recomputed. Recomputing them ("precise BN", Wu and Johnson,
"Rethinking 'Batch' in BatchNorm", 2021) from a number of training batches with the weights fixed removes the lag.

What it adds to ``torch.optim.swa_utils.update_bn`` (the same cumulative average): the trainer's own batches
through its ``prepare_batch`` (dictionary batches, the networks' extra inputs), a budget of batches, autocast as
MONAI's trainer runs its forwards, the statistics averaged over DDP ranks (so every rank keeps the same model),
every module's own mode kept, and no change to a network without BatchNorm. For ISNet and plain steps it changes
only eval-mode behaviour (training forwards use the batch statistics); GAIN's erased-image forward runs in eval
mode, so GAIN's training changes too: each epoch starts from statistics that match the weights.
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
def recompute_batchnorm_statistics(network: torch.nn.Module, batches: Iterable, autocast: dict | None = None) -> int:
    """Set the running mean and variance of every BatchNorm to the average of the batch statistics of ``batches``
    (each a tensor, or ``(x, args, kwargs)`` for ``network(x, *args, **kwargs)``) with the weights as they are,
    the network in train mode for the forwards (as ``update_bn``). ``autocast``: the keyword arguments of
    ``torch.autocast`` for the forwards (the trainer's AMP), None for none. Under DDP (an initialised process
    group) the statistics are averaged over the ranks, weighted by their numbers of batches. Returns the number of
    batches used here; with none the statistics are left as they were. Every module's mode and every momentum are
    restored."""
    bns = _batchnorms(network)
    if not bns:
        return 0
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in bns]
    modes = {m: m.training for m in network.modules()}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    network.train()
    n = 0
    try:
        for batch in batches:
            x, args, kwargs = (batch, (), {}) if isinstance(batch, torch.Tensor) else batch
            ctx = torch.autocast(**autocast) if autocast else contextlib.nullcontext()
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
        for m, flag in modes.items():
            m.training = flag
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = bns[0].running_mean.device
        total = torch.tensor([float(n)], device=device)
        torch.distributed.all_reduce(total)  # every rank calls the same reductions, whatever its n
        if total.item() > 0:
            for m in bns:
                for buf in (m.running_mean, m.running_var):
                    weighted = buf.float() * n
                    torch.distributed.all_reduce(weighted)
                    buf.copy_(weighted / total)
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
        device = torch.device(engine.state.device) if engine.state.device is not None else torch.device("cpu")
        # autocast as MONAI's trainer runs its forwards: CUDA only, with the trainer's amp_kwargs
        amp = {"device_type": "cuda", **(getattr(engine, "amp_kwargs", None) or {})} if getattr(engine, "amp", False) and device.type == "cuda" else None
        n = recompute_batchnorm_statistics(network, self._batches(engine), autocast=amp)
        if n:
            logger.info("epoch %d: BatchNorm statistics recomputed from %d training batches", engine.state.epoch, n)
