"""Networks: backbones with a deliberate stem, and the task heads."""

from cutremain_monai.networks.backbones import RESNET_LAYOUTS, resnet

__all__ = ["resnet", "RESNET_LAYOUTS"]
