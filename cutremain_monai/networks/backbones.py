"""Classification backbones from ``monai.networks.nets.ResNet`` with the stem chosen on purpose.

MONAI's ResNet keeps a stride-1 first convolution by default (``conv1_t_stride=1``), which on a 2D X-ray is 4-12x
slower than the usual stride-2 ImageNet stem (../shared/STACK.md) for no accuracy reason we know of at 224-448 px.
:func:`resnet` builds the standard layouts (18/34/50/101) with the stride-2 7x7 stem and max pooling.

The blocks are MONAI's, with one change that LRP needs (:mod:`cutremain_monai.localization.lrp`): MONAI's blocks
call one in-place ``self.act`` ReLU two or three times, so a hook on that module cannot tell its uses apart. The
blocks built here keep ``act`` for the first use and add ``act2`` (bottleneck only) and ``act_out`` (after the
residual sum), all non-in-place. ReLUs have no parameters: the state dict keys, the weights' layout and the outputs
are those of the plain MONAI ResNet, so existing checkpoints load unchanged. Module names are MONAI's: ``conv1``,
``bn1``, ``act``, ``maxpool``, ``layer1`` .. ``layer4``, ``avgpool``, ``fc``.
"""

from __future__ import annotations

import torch
from monai.networks.layers.utils import get_act_layer
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

__all__ = ["resnet", "RESNET_LAYOUTS", "LRPReadyResNetBlock", "LRPReadyResNetBottleneck", "make_resnet_lrp_ready"]

RESNET_LAYOUTS = {
    10: ("basic", [1, 1, 1, 1]),
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
}

_RELU = ("relu", {"inplace": False})


class LRPReadyResNetBlock(ResNetBlock):
    """MONAI's basic block with one non-in-place ReLU per use: ``act`` (after ``bn1``) and ``act_out`` (after the sum)."""

    def __init__(self, *args, act: str | tuple = _RELU, **kwargs) -> None:
        super().__init__(*args, act=act, **kwargs)
        self.act_out = get_act_layer(name=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.act_out(out + residual)


class LRPReadyResNetBottleneck(ResNetBottleneck):
    """MONAI's bottleneck with one non-in-place ReLU per use: ``act`` (after ``bn1``), ``act2``, ``act_out``."""

    def __init__(self, *args, act: str | tuple = _RELU, **kwargs) -> None:
        super().__init__(*args, act=act, **kwargs)
        self.act2 = get_act_layer(name=act)
        self.act_out = get_act_layer(name=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.act_out(out + residual)


def make_resnet_lrp_ready(model: nn.Module) -> nn.Module:
    """Convert, in place, the blocks of a plain MONAI ResNet to the LRP-ready ones above; ReLUs become non-in-place.

    Only ReLU modules are added, so weights, state dict keys and outputs are unchanged. Returns ``model``.
    """
    for module in model.modules():
        if isinstance(module, ResNetBottleneck) and not isinstance(module, LRPReadyResNetBottleneck):
            module.__class__ = LRPReadyResNetBottleneck
            module.act2 = get_act_layer(name=_RELU)
            module.act_out = get_act_layer(name=_RELU)
        elif isinstance(module, ResNetBlock) and not isinstance(module, LRPReadyResNetBlock):
            module.__class__ = LRPReadyResNetBlock
            module.act_out = get_act_layer(name=_RELU)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


def resnet(depth: int = 50, in_channels: int = 1, num_classes: int = 1, stem_stride: int = 2, spatial_dims: int = 2, widen_factor: float = 1.0) -> ResNet:
    """A MONAI ResNet-``depth`` from random weights; ``stem_stride=2`` is the standard (fast) stem.

    Same weights, names and outputs as ``monai.networks.nets.ResNet``; its ReLUs are non-in-place and each is used
    once (see the module docstring), which LRP-Flex needs.
    """
    if depth not in RESNET_LAYOUTS:
        raise ValueError(f"depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
    block, layers = RESNET_LAYOUTS[depth]
    return ResNet(
        block=LRPReadyResNetBlock if block == "basic" else LRPReadyResNetBottleneck,
        layers=layers,
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=stem_stride,
        num_classes=num_classes,
        widen_factor=widen_factor,
        act=_RELU,
    )
