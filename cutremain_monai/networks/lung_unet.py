"""Lung segmentation stage of the COVID severity pipeline: MONAI's 2D ``UNet`` (one sigmoid output: lung) and the
seed paper's post-processing, in one place so training, evaluation and inference build the same things.

What this adds to MONAI: the post-processing chain for a two-lung mask (threshold, keep the two largest connected
components, fill holes: ``AsDiscrete`` + ``KeepLargestConnectedComponent(num_components=2)`` + ``FillHoles``), and
``segment_lungs``, which runs the model on an already preprocessed ``(1, H, W)`` image at the model's size and
returns the mask at any requested size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from monai.transforms import AsDiscrete, Compose, FillHoles, KeepLargestConnectedComponent

__all__ = ["lung_unet", "lung_postprocess", "segment_lungs"]


def lung_unet(channels: Sequence[int] = (16, 32, 64, 128, 256), num_res_units: int = 2, dropout: float = 0.0) -> UNet:
    """``(B, 1, H, W)`` image -> ``(B, 1, H, W)`` lung logits (H, W divisible by 2 ** (len(channels) - 1))."""
    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(channels),
                strides=(2,) * (len(channels) - 1), num_res_units=num_res_units, dropout=dropout)


def lung_postprocess(threshold: float = 0.5) -> Compose:
    """Probabilities ``(1, H, W)`` -> {0, 1} mask with the two largest components, holes filled."""
    return Compose([AsDiscrete(threshold=threshold), KeepLargestConnectedComponent(applied_labels=[1], num_components=2),
                    FillHoles(applied_labels=[1])])


@torch.no_grad()
def segment_lungs(network: torch.nn.Module, image: torch.Tensor, model_size: int, out_size: Sequence[int] | None = None,
                  threshold: float = 0.5) -> torch.Tensor:
    """``image (1, H, W)`` preprocessed -> float {0, 1} lung mask ``(1, *out_size)`` (default: the input's size)."""
    out_size = tuple(out_size or image.shape[-2:])
    device = next(network.parameters()).device
    x = F.interpolate(image[None].float().to(device), size=(model_size, model_size), mode="area")
    prob = torch.sigmoid(network.eval()(x))[0].cpu()
    mask = lung_postprocess(threshold)(prob)
    mask = F.interpolate(torch.as_tensor(mask)[None].float(), size=out_size, mode="nearest")[0]
    return mask
