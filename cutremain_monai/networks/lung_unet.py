"""Lung segmentation stage of the COVID severity pipeline: MONAI's 2D ``UNet`` (one sigmoid output: lung) and the
seed paper's post-processing, in one place so training, evaluation and inference build the same things.

What this adds to MONAI: the post-processing chain for a two-lung mask (threshold, keep the two largest connected
components, fill holes: ``AsDiscrete`` + ``KeepLargestConnectedComponent(num_components=2)`` + ``FillHoles``), and
``segment_lungs``, which runs the model on an already preprocessed ``(1, H, W)`` image at the model's size and
returns the mask at any requested size.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from monai.config import KeysCollection
from monai.transforms import AsDiscrete, Compose, FillHoles, KeepLargestConnectedComponent, MapTransform

from cutremain_monai.networks.ensemble import checkpoint_state

__all__ = ["lung_unet", "lung_postprocess", "segment_lungs", "SegmentLungsd"]


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


class SegmentLungsd(MapTransform):
    """Dictionary transform: where a sample has no ``mask_key`` (a lung mask from a file), make one with the lung
    U-Net from ``checkpoint`` on the already preprocessed ``image`` (``segment_lungs``, at ``model_size``, returned
    at the image's size), and record in ``source_key`` whether the mask came from a ``file`` or was ``segmented``.

    This puts the segmentation stage inside the bundle's one preprocessing chain (before ``LungZonesd``), so
    training (masks from the datalist: the model is never built), evaluation and folder inference share it. The
    network and its weights are loaded on first use; a sample without a mask and no checkpoint raises, naming the
    file (the dataset then sets it aside with that reason).
    """

    def __init__(self, keys: KeysCollection = "image", mask_key: str = "lung_mask", checkpoint: str | None = None,
                 channels: Sequence[int] = (16, 32, 64, 128, 256), model_size: int = 256, threshold: float = 0.5,
                 source_key: str = "mask_source", path_key: str = "image_path", device=None):
        super().__init__(keys)
        self.mask_key, self.source_key, self.path_key = mask_key, source_key, path_key
        self.checkpoint, self.channels, self.model_size, self.threshold = checkpoint, tuple(channels), model_size, threshold
        self.device = device
        self._net: torch.nn.Module | None = None

    def __getstate__(self) -> dict:  # DataLoader workers load their own copy (a CUDA model cannot be forked)
        state = dict(self.__dict__)
        state["_net"] = None
        return state

    def _network(self, name: str) -> torch.nn.Module:
        if self._net is None:
            if not self.checkpoint or not os.path.exists(self.checkpoint):
                raise FileNotFoundError(f"{name}: no lung mask given and no lung-segmentation checkpoint at "
                                        f"{self.checkpoint} (train lung_seg.yaml, or give masks)")
            net = lung_unet(self.channels)
            net.load_state_dict(checkpoint_state(self.checkpoint))
            self._net = net.to(self.device or "cpu").eval()
        return self._net

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if d.get(self.mask_key) is not None and not isinstance(d[self.mask_key], (str, os.PathLike)):
            d[self.source_key] = "file"
            return d
        for key in self.key_iterator(d):
            net = self._network(str(d.get(self.path_key, key)))
            image = torch.as_tensor(d[key])
            d[self.mask_key] = segment_lungs(net, image, self.model_size, image.shape[-2:], self.threshold)
            d[self.source_key] = "segmented"
        return d
