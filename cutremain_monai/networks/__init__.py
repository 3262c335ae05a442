"""Networks: backbones with a deliberate stem, and the task heads."""

from cutremain_monai.networks.backbones import RESNET_LAYOUTS, resnet
from cutremain_monai.networks.lung_zone_pool import LungZoneMaxPool, lung_zone_max_pool
from cutremain_monai.networks.severity_vit import SMALL, VIT_B16, SeverityViT

__all__ = ["resnet", "RESNET_LAYOUTS", "LungZoneMaxPool", "lung_zone_max_pool", "SeverityViT", "VIT_B16", "SMALL"]
