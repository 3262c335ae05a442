"""Classification backbones from ``monai.networks.nets.ResNet`` with the stem chosen on purpose.

MONAI's ResNet keeps a stride-1 first convolution by default (``conv1_t_stride=1``), which on a 2D X-ray is 4-12x
slower than the usual stride-2 ImageNet stem (../shared/STACK.md) for no accuracy reason we know of at 224-448 px.
:func:`resnet` builds the standard layouts (18/34/50/101) with the stride-2 7x7 stem and max pooling.
"""

from __future__ import annotations

from monai.networks.nets import ResNet

__all__ = ["resnet", "RESNET_LAYOUTS"]

RESNET_LAYOUTS = {
    10: ("basic", [1, 1, 1, 1]),
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
}


def resnet(depth: int = 50, in_channels: int = 1, num_classes: int = 1, stem_stride: int = 2, spatial_dims: int = 2, widen_factor: float = 1.0) -> ResNet:
    """A MONAI ResNet-``depth`` from random weights; ``stem_stride=2`` is the standard (fast) stem."""
    if depth not in RESNET_LAYOUTS:
        raise ValueError(f"depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
    block, layers = RESNET_LAYOUTS[depth]
    return ResNet(
        block=block,
        layers=layers,
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=stem_stride,
        num_classes=num_classes,
        widen_factor=widen_factor,
    )
