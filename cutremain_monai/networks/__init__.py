"""Networks: backbones with a deliberate stem, and the task heads."""

from cutremain_monai.networks.backbones import RESNET_LAYOUTS, resnet
from cutremain_monai.networks.ensemble import CheckpointEnsemble, checkpoint_state
from cutremain_monai.networks.lung_unet import SegmentLungsd, lung_postprocess, lung_unet, segment_lungs
from cutremain_monai.networks.lung_zone_pool import LungZoneMaxPool, lung_zone_max_pool
from cutremain_monai.networks.patch_classifier import BACKBONES, patch_classifier, vgg16
from cutremain_monai.networks.severity_vit import SMALL, VIT_B16, PackedSeverityViT, SeverityViT

__all__ = ["CheckpointEnsemble", "checkpoint_state", "SegmentLungsd", "lung_unet", "lung_postprocess", "segment_lungs", "resnet", "RESNET_LAYOUTS", "LungZoneMaxPool", "lung_zone_max_pool", "SeverityViT", "PackedSeverityViT", "VIT_B16", "SMALL", "BACKBONES", "patch_classifier", "vgg16"]
