"""SeverityViT: COVID-19 severity and lesion localisation on chest X-rays (the seed paper's model).

DenseNet-121 features taken before transition layer 3 (``(B, 1024, 16, 16)`` for a 256x256 input, MONAI's
``DenseNet121``), a 1x1 convolution to the embedding size, a class token and learned positional embeddings, a
transformer encoder (MONAI ``TransformerBlock``; ViT-B/16 sizes by default, :data:`SMALL` for a CPU), a map head of
four 2x upsampling convolution blocks back to the input size, a sigmoid, multiplied by the lung mask, then
:class:`~cutremain_monai.networks.lung_zone_pool.LungZoneMaxPool` over the Brixia zone map. Outputs the six zone
probabilities ``(B, 6)`` (trained with binary cross-entropy against the binarised zone scores) and the lesion
probability map ``(B, 1, H, W)``.

Feature-extractor weights load from a file path when the user has them (nothing is downloaded); otherwise the
network starts from random weights. ``freeze_features`` stops their gradients.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence

import torch
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import DenseNet121
from torch import nn

from cutremain_monai.networks.lung_zone_pool import LungZoneMaxPool, lung_zone_max_pool

__all__ = ["SeverityViT", "PackedSeverityViT", "VIT_B16", "SMALL", "EMPTY_ZONE_LOGIT", "densenet_feature_state"]

VIT_B16 = {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072}
SMALL = {"embed_dim": 192, "depth": 4, "num_heads": 3, "mlp_dim": 768}
EMPTY_ZONE_LOGIT = -20.0


_OLD_TORCHVISION = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
_LAYER = re.compile(r"^(denseblock\d+\.denselayer\d+\.)(?!layers\.)")


def densenet_feature_state(state: dict, in_channels: int = 1) -> dict:
    """A DenseNet-121 state dict in the key layout of MONAI ``DenseNet121(...).features``.

    Accepts what users already hold: a MONAI ``DenseNet121`` state dict; torchxrayvision's ``xrv.models.DenseNet``
    and torchvision's ``densenet121`` (their dense layers hold ``norm1`` ... ``conv2`` directly, MONAI's under
    ``layers.``; torchvision's oldest checkpoints spell ``norm.1``); each with or without the ``features.`` prefix, a
    ``module.`` prefix (DataParallel), or wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``. A 3-channel first
    convolution (ImageNet weights) is summed over its input channels for a 1-channel X-ray, which gives the same
    output as the grey image repeated in the three channels. The classifier is left out."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise ValueError("not a state dict")
    out = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue
        k = key[len("module."):] if key.startswith("module.") else key
        k = k[len("features."):] if k.startswith("features.") else k
        if k.startswith(("classifier.", "class_layers.", "fc.")) or k == "op_threshs":
            continue
        m = _OLD_TORCHVISION.match(k)
        if m:
            k = m.group(1) + m.group(2)
        k = _LAYER.sub(r"\1layers.", k)
        out[k] = value
    w = out.get("conv0.weight")
    if w is not None and w.ndim == 4 and w.shape[1] != in_channels:
        if in_channels == 1:
            out["conv0.weight"] = w.sum(dim=1, keepdim=True)
        else:
            raise ValueError(f"conv0.weight has {w.shape[1]} input channels, the network {in_channels}")
    return out


def _up_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SeverityViT(nn.Module):
    """Args:
        in_channels: image channels (1 for X-rays).
        img_size: input side (256 in the paper); the token grid is ``img_size // 16``.
        embed_dim / depth / num_heads / mlp_dim: transformer sizes (:data:`VIT_B16` default, :data:`SMALL`).
        feature_weights: path to DenseNet-121 weights to start the feature extractor from: a state dict of MONAI
            ``DenseNet121``, of torchxrayvision's ``xrv.models.DenseNet`` or of torchvision's ``densenet121`` (or of
            their ``features``; see :func:`densenet_feature_state`).
        freeze_features: keep the DenseNet features fixed.
        feature_input_range: ``[low, high]``: the [0, 1] input is mapped onto this range before the DenseNet
            features (torchxrayvision's weights were trained on images scaled to ``[-1024, 1024]``); None: as is.
        return_map: ``forward`` returns (zone probabilities, lesion map); False: the zone probabilities only (what
            MONAI's trainer/evaluator and the loss take; the map is then :meth:`masked_map`).
    """

    def __init__(self, in_channels: int = 1, img_size: int = 256, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_dim: int = 3072, dropout: float = 0.0, feature_weights: str | None = None,
                 freeze_features: bool = False, return_map: bool = True,
                 feature_input_range: Sequence[float] | None = None):
        super().__init__()
        self.return_map = return_map
        if feature_input_range is not None and len(feature_input_range) != 2:
            raise ValueError(f"feature_input_range must be [low, high], got {feature_input_range}")
        self.feature_input_range = None if feature_input_range is None else tuple(float(v) for v in feature_input_range)
        if img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16, got {img_size}")
        densenet = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1)
        # everything before transition3: conv0 .. denseblock3 -> 1024 channels at 1/16 of the input
        names = ["conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2", "transition2", "denseblock3"]
        self.features = nn.Sequential(OrderedDict((n, getattr(densenet.features, n)) for n in names))
        if feature_weights:
            self._load_features(feature_weights)
        if freeze_features:
            for p in self.features.parameters():
                p.requires_grad_(False)
        self.grid = img_size // 16
        self.embed = nn.Conv2d(1024, embed_dim, kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList([TransformerBlock(embed_dim, mlp_dim, num_heads, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        chans = [embed_dim, 256, 128, 64, 32]
        self.head = nn.Sequential(*[_up_block(a, b) for a, b in zip(chans[:-1], chans[1:])], nn.Conv2d(32, 1, 1))
        self.pool = LungZoneMaxPool()

    def _load_features(self, path: str) -> None:
        """Load ``path`` into :attr:`features` through :func:`densenet_feature_state`; a ``ValueError`` names the
        file and what is wrong with it."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickled nn.Module (torchxrayvision's downloads) needs code execution to load
            raise ValueError(f"{path}: not a plain state dict ({type(e).__name__}); a pickled model, such as the files "
                             "torchxrayvision downloads, must be saved as its state dict first: "
                             "torch.save(model.state_dict(), 'densenet121.pt')") from e
        wanted = self.features.state_dict()
        try:
            mapped = densenet_feature_state(state, in_channels=wanted["conv0.weight"].shape[1])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        missing = [k for k in wanted if k not in mapped and not k.endswith("num_batches_tracked")]  # (older files)
        if missing:
            raise ValueError(f"{path}: not DenseNet-121 feature weights (missing {missing[0]} and {len(missing) - 1} more)")
        used = tuple(f"{n}." for n in self.features._modules)
        extra = [k for k in mapped if k.startswith(used) and k not in wanted]
        if extra:
            raise ValueError(f"{path}: {extra[0]} (and {len(extra) - 1} more) is not in DenseNet-121's first three "
                             "blocks: another DenseNet (169, 201?)")
        bad = [k for k in wanted if k in mapped and tuple(mapped[k].shape) != tuple(wanted[k].shape)]
        if bad:
            raise ValueError(f"{path}: {bad[0]} has shape {tuple(mapped[bad[0]].shape)}, expected {tuple(wanted[bad[0]].shape)} "
                             "(not DenseNet-121: another growth rate or block sizes?)")
        self.features.load_state_dict({k: mapped.get(k, wanted[k]) for k in wanted})

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_input_range is None:
            return x
        lo, hi = self.feature_input_range
        return x * (hi - lo) + lo

    def lesion_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The map head's output ``(B, 1, H, W)`` before the sigmoid and the lung mask."""
        f = self.embed(self.features(self._scaled(x)))  # (B, D, g, g)
        b, d, g, _ = f.shape
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), f.flatten(2).transpose(1, 2)], dim=1) + self.pos_embed
        for blk in self.blocks:
            tokens = blk(tokens)
        tokens = self.norm(tokens)[:, 1:]  # drop the class token for the map
        grid = tokens.transpose(1, 2).reshape(b, d, g, g)
        return self.head(grid)

    def lesion_map(self, x: torch.Tensor) -> torch.Tensor:
        """Lesion probability map ``(B, 1, H, W)`` before the lung mask."""
        return torch.sigmoid(self.lesion_logits(x))

    def zone_logits(self, x: torch.Tensor, zones: torch.Tensor) -> torch.Tensor:
        """The six zone logits ``(B, 6)``: the maximum of :meth:`lesion_logits` over each zone's pixels, whose
        sigmoid is the zone probability of :meth:`forward` (the sigmoid is increasing and the zones lie inside the
        lung mask). An empty zone gets :data:`EMPTY_ZONE_LOGIT` (probability ~0, as the probability path pools it
        as 0). What ISNet explains (LRP starts from logits, not probabilities)."""
        pooled, empty = lung_zone_max_pool(self.lesion_logits(x), zones, return_empty=True)
        return torch.where(empty, torch.full_like(pooled, EMPTY_ZONE_LOGIT), pooled)

    def masked_map(self, x: torch.Tensor, lung_mask: torch.Tensor) -> torch.Tensor:
        """Lesion probability map ``(B, 1, H, W)`` multiplied by the lung mask."""
        return self.lesion_map(x) * (lung_mask > 0).to(x.dtype)

    def forward(self, x: torch.Tensor, lung_mask: torch.Tensor, zones: torch.Tensor, logits: bool = False):
        """``x, lung_mask, zones: (B, 1, H, W)`` -> (zone probabilities ``(B, 6)``, lesion map ``(B, 1, H, W)``),
        or the zone probabilities alone with ``return_map=False``; ``logits=True``: the zone logits ``(B, 6)``
        alone (:meth:`zone_logits`; a keyword, so a ``DistributedDataParallel`` wrapper passes it on)."""
        if logits:
            return self.zone_logits(x, zones)
        prob = self.masked_map(x, lung_mask)
        zone_prob = self.pool(prob, zones)
        return (zone_prob, prob) if self.return_map else zone_prob


class PackedSeverityViT(nn.Module):
    """One-tensor front of :class:`SeverityViT` for model registries and TorchScript-style serving:
    ``(B, 3, H, W)`` = image, lung mask, zone map (as float) -> zone probabilities ``(B, 6)``."""

    def __init__(self, model: SeverityViT):
        super().__init__()
        self.model = model
        self._register_load_state_dict_pre_hook(self._prefix_keys)

    @staticmethod
    def _prefix_keys(state_dict, prefix, *args) -> None:
        """Accept the wrapped model's own checkpoint (keys without ``model.``), so ``ckpt_export`` and
        ``verify_net_in_out`` take the training checkpoint as it is."""
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "model.")]:
            state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        out = self.model(packed[:, :1], packed[:, 1:2], packed[:, 2:3].round().to(torch.uint8))
        return out[0] if isinstance(out, tuple) else out
