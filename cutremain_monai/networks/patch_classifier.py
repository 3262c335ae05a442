"""Binary patch classifiers for background learning (seed 003): one logit, ``sigmoid`` = P(target).

``resnet10/18/34/50`` are :func:`~cutremain_monai.networks.resnet` (MONAI ResNet, stride-2 stem, one input channel);
``vgg16`` is VGG-16's configuration D (Simonyan & Zisserman 2015: 13 3x3 convolutions in five blocks with max
pooling) with BatchNorm after each convolution, global average pooling and one linear layer, so any patch size
of at least 32 px works (the seed's 48 px included; the original's 4096-wide fully connected layers assume
224 px). MONAI has no VGG; torchvision's does not import beside the CPU torch wheel here.
"""

from __future__ import annotations

from torch import nn

from cutremain_monai.networks.backbones import RESNET_LAYOUTS, resnet

__all__ = ["BACKBONES", "patch_classifier", "vgg16"]

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
BACKBONES = tuple(f"resnet{d}" for d in RESNET_LAYOUTS) + ("vgg16",)


def vgg16(in_channels: int = 1, num_classes: int = 1, width: float = 1.0) -> nn.Sequential:
    """VGG-16 (configuration D) with BatchNorm, global average pooling and a linear head; ``width`` scales the
    channels (0.25 for a CPU)."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = max(1, int(v * width))
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def patch_classifier(backbone: str = "resnet18", in_channels: int = 1, width: float = 1.0) -> nn.Module:
    """The patch classifier: ``backbone`` in :data:`BACKBONES`, one logit. ``width`` scales the channels (ResNet:
    MONAI's ``widen_factor``)."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
    if backbone == "vgg16":
        return vgg16(in_channels, 1, width)
    return resnet(int(backbone[len("resnet"):]), in_channels=in_channels, num_classes=1, widen_factor=width)
