"""The Cut&Remain paper's feature-similarity study (Table 6): how far an augmented copy moves the network's
last-convolution features away from its original.

For each (original, augmented) pair the features are the global-average-pooled output of ``layer`` (``layer4`` of
a ResNet); reported are the mean Euclidean distance and the mean cosine distance (1 - cosine similarity) over the
pairs. A small distance means the copy still "looks like" the original to the network (Cut&Remain keeps the
lesion's position and scale, which is the paper's argument).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["pooled_features", "feature_distances"]


def pooled_features(network: torch.nn.Module, images: torch.Tensor, layer: str = "layer4") -> torch.Tensor:
    """``(B, C)`` global-average-pooled activations of ``layer`` for ``images`` ``(B, 1, H, W)``."""
    net = network.module if hasattr(network, "module") else network
    module = dict(net.named_modules()).get(layer)
    if module is None:
        raise ValueError(f"layer {layer!r} not found in {type(net).__name__}")
    captured = {}
    handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(images)
    finally:
        handle.remove()
        net.train(was_training)
    return captured["x"].flatten(2).mean(-1)


def feature_distances(network: torch.nn.Module, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], layer: str = "layer4") -> dict:
    """Mean Euclidean and cosine distance between pooled features of each ``(original, augmented)`` image pair."""
    eu, co = [], []
    for original, augmented in pairs:
        x = torch.stack([torch.as_tensor(original), torch.as_tensor(augmented)]).float()
        device = next(network.parameters()).device
        f = pooled_features(network, x.to(device), layer)
        eu.append(float(torch.linalg.vector_norm(f[0] - f[1])))
        co.append(float(1 - torch.nn.functional.cosine_similarity(f[0:1], f[1:2]).item()))
    if not eu:
        return {"euclidean": float("nan"), "cosine": float("nan"), "pairs": 0}
    return {"euclidean": sum(eu) / len(eu), "cosine": sum(co) / len(co), "pairs": len(eu)}
