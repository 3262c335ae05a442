"""The segmentation network of AE-PSL's "prohibitive segmentation learning" stage (Wei et al., CVPR 2017; seed
002), with the image-level class probabilities weighting its pixel scores.

``PSLNet`` is a ResNet encoder (:func:`~cutremain_monai.networks.resnet`, stride-2 stem) with a light FPN decoder
(lateral 1x1 convolutions of ``layer1`` .. ``layer4`` to ``decoder_channels``, top-down upsample-and-add, one 3x3
convolution at stride 4) and two heads on the same features:

- the segmentation head: ``num_classes + 1`` score maps (channel 0 background, channel ``c + 1`` class ``c``),
  upsampled bilinearly to the input size;
- the classification head: global average pooling of ``layer4`` and a linear layer, ``num_classes`` logits
  (sigmoid: the image-level probability of each class).

:func:`class_weighted_log_probs` is PSL's "prohibitive" step: the softmax of the pixel scores is multiplied by the
image-level probabilities (background weight 1) and renormalised, so a class the classification head rejects
cannot take pixels. ``forward(x)`` returns those renormalised probabilities ``(B, C + 1, H, W)`` (what inference,
TorchScript and the localisation metrics use); ``forward(x, return_parts=True)`` returns ``(pixel scores, class
logits)`` for the training step (through DDP, which wraps only ``forward``).

What this adds to MONAI (``FlexibleUNet``, ``UNet``): the classification head on the encoder's features and the
class-probability weighting that PSL needs. The encoder is the project's LRP-ready ResNet under ``encoder.``: a
classification bundle's checkpoint of the same depth maps onto it by adding that prefix (not done automatically).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cutremain_monai.networks.backbones import RESNET_LAYOUTS, resnet

__all__ = ["PSLNet", "class_weighted_log_probs", "class_weighted_probs"]


def class_weighted_log_probs(seg_logits: torch.Tensor, class_logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``log`` of PSL's weighted pixel probabilities.

    ``seg_logits``: ``(B, C + 1, H, W)`` (channel 0 background); ``class_logits``: ``(B, C)``. With ``f = softmax(seg)``
    over channels and ``p = sigmoid(class_logits)``, the weighted probability of class ``k`` at a pixel is
    ``w_k f_k / sum_j w_j f_j`` with ``w_0 = 1`` and ``w_{c+1} = p_c`` (clamped to ``eps`` so the log stays finite).
    Computed in log space: ``log_softmax(seg + log w)``. Returns ``(B, C + 1, H, W)``.
    """
    if seg_logits.ndim != 4 or class_logits.ndim != 2:
        raise ValueError(f"seg_logits must be (B, C+1, H, W) and class_logits (B, C); got {tuple(seg_logits.shape)} "
                         f"and {tuple(class_logits.shape)}")
    if seg_logits.shape[0] != class_logits.shape[0] or seg_logits.shape[1] != class_logits.shape[1] + 1:
        raise ValueError(f"seg_logits {tuple(seg_logits.shape)} needs one channel more than class_logits "
                         f"{tuple(class_logits.shape)} (the background) and the same batch")
    log_w = F.logsigmoid(class_logits.float()).clamp_min(float(np.log(eps)))
    log_w = torch.cat([torch.zeros_like(log_w[:, :1]), log_w], 1)[..., None, None]
    return torch.log_softmax(seg_logits.float() + log_w, dim=1)


def class_weighted_probs(seg_logits: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """:func:`class_weighted_log_probs`, exponentiated (each pixel's channels sum to 1)."""
    return class_weighted_log_probs(seg_logits, class_logits).exp()


class PSLNet(nn.Module):
    """ResNet-FPN segmentation network with a classification head (module doc).

    Args:
        depth: ResNet depth (10, 18, 34, 50, 101).
        in_channels: image channels (1 for X-rays).
        num_classes: foreground classes ``C`` (1 for a binary lesion task); the segmentation head has ``C + 1``.
        decoder_channels: width of the FPN decoder.
        widen_factor: MONAI's ResNet width factor.
    """

    def __init__(self, depth: int = 18, in_channels: int = 1, num_classes: int = 1, decoder_channels: int = 64,
                 widen_factor: float = 1.0) -> None:
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.encoder = resnet(depth, in_channels=in_channels, num_classes=num_classes, widen_factor=widen_factor)
        widths = [self._out_channels(getattr(self.encoder, f"layer{i}")) for i in range(1, 5)]
        self.lateral = nn.ModuleList(nn.Conv2d(w, decoder_channels, 1) for w in widths)
        self.smooth = nn.Sequential(nn.Conv2d(decoder_channels, decoder_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(decoder_channels), nn.ReLU())
        self.seg_head = nn.Conv2d(decoder_channels, num_classes + 1, 1)

    @staticmethod
    def _out_channels(layer: nn.Module) -> int:
        block = layer[-1]
        return int((block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixel scores (B, C + 1, H, W) at the input size, class logits (B, C))``."""
        e = self.encoder
        h = e.act(e.bn1(e.conv1(x)))
        if not e.no_max_pool:
            h = e.maxpool(h)
        feats = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(e, name)(h)
            feats.append(h)
        class_logits = e.fc(torch.flatten(e.avgpool(feats[-1]), 1))
        top = self.lateral[3](feats[3])
        for i in (2, 1, 0):
            lat = self.lateral[i](feats[i])
            top = lat + F.interpolate(top, size=lat.shape[-2:], mode="bilinear", align_corners=False)
        seg = self.seg_head(self.smooth(top))
        seg = F.interpolate(seg, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return seg, class_logits

    def forward(self, x: torch.Tensor, return_parts: bool = False):
        seg, cls = self.parts(x)
        if return_parts:
            return seg, cls
        return class_weighted_probs(seg, cls)
