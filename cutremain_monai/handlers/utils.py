"""Helpers shared by the handlers: the process rank, and the trained network with its best weights."""

from __future__ import annotations

import copy
import os

import torch
from monai.utils import evenly_divisible_all_gather

from cutremain_monai.networks.ensemble import checkpoint_state

__all__ = ["rank", "gather_all", "best_model", "key_metric_trackers"]


def rank() -> int:
    """This process's rank under torch.distributed, 0 when not distributed."""
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def gather_all(t: torch.Tensor) -> torch.Tensor:
    """``t`` concatenated over every process under torch.distributed (MONAI's even all-gather; uneven shards padded
    and trimmed), ``t`` itself when not distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    return evenly_divisible_all_gather(t, concat=True)


def key_metric_trackers(savers) -> list:
    """The ignite ``Checkpoint`` with which each MONAI ``CheckpointSaver`` of ``savers`` (one, or a list) keeps its
    best models and their scores (MONAI holds it privately); savers that keep no key-metric model are left out."""
    savers = savers if isinstance(savers, (list, tuple)) else [savers]
    return [c for c in (getattr(s, "_key_metric_checkpoint", None) for s in savers) if c is not None]


def best_model(network: torch.nn.Module, checkpoint: str | None = None) -> torch.nn.Module:
    """An eval-mode copy of ``network`` (DDP unwrapped) with the weights of ``checkpoint`` when it exists
    (a plain state dict, or MONAI's ``{"model": ...}`` checkpoint)."""
    net = network.module if hasattr(network, "module") else network
    model = copy.deepcopy(net).eval()
    if checkpoint and os.path.exists(checkpoint):
        model.load_state_dict(checkpoint_state(checkpoint))
    return model
