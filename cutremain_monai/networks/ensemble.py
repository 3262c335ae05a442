"""Test-time ensemble of checkpoints (the seed paper averages the last three): one module whose forward is the mean
of the members' outputs, so MONAI's evaluator, inferers and handlers use it like any network.

Members are deep copies of ``network`` with each checkpoint's ``model`` state (MONAI ``CheckpointSaver`` files, or
a bare state dict). Outputs are averaged element-wise; a tuple output (e.g. ``SeverityViT`` with ``return_map``)
is averaged per element.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["CheckpointEnsemble", "checkpoint_state"]


def checkpoint_state(path: str) -> dict:
    """The model weights in ``path``: a MONAI ``CheckpointSaver`` file (``{"model": ..., "optimizer": ...}``) or a
    bare state dict. The one place the project reads a checkpoint outside MONAI's ``CheckpointLoader``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"] if isinstance(state, dict) and "model" in state else state


class CheckpointEnsemble(nn.Module):
    """Args:
        network: the architecture (its own weights are not used once checkpoints are given).
        checkpoints: checkpoint paths; an empty list is an error naming ``what``.
    """

    def __init__(self, network: nn.Module, checkpoints: Sequence[str], what: str = "ensemble"):
        super().__init__()
        if not checkpoints:
            raise FileNotFoundError(f"{what}: no checkpoints to ensemble (train first)")
        base = network.module if hasattr(network, "module") else network  # unwrap DDP
        self.members = nn.ModuleList()
        for path in checkpoints:
            m = copy.deepcopy(base)
            try:
                m.load_state_dict(checkpoint_state(path))
            except RuntimeError as e:
                raise ValueError(f"{path}: does not match the network ({str(e).splitlines()[0]})") from e
            self.members.append(m)
        self.checkpoints = list(checkpoints)

    def forward(self, *args, **kwargs):
        outs = [m(*args, **kwargs) for m in self.members]
        if isinstance(outs[0], (tuple, list)):
            return type(outs[0])(torch.stack(parts).mean(0) for parts in zip(*outs))
        return torch.stack(outs).mean(0)
