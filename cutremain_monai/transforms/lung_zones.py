"""Brixia lung zones from a lung mask as MONAI transforms: ``LungZones`` / ``LungZonesd`` around the pure function
:func:`cutremain_monai.data.lung_zones.split_lung_zones` (re-exported here; the phantom generator uses it too).

Seed paper (COVID severity ViT): the two lungs are separated by connected components, and each lung is cut at
5/12 and 2/3 of the way from its highest to its lowest mask row. The zone map is 0 outside the lungs and 1..6 in
the Brixia order: A/B/C = upper/middle/lower of the IMAGE-LEFT lung, D/E/F of the IMAGE-RIGHT lung.
When the two lungs touch (one component), the mask is split at the column with the fewest lung pixels in the
middle third of the mask's width (the midline gap), provided that column holds less than half the median column
height; otherwise the mask is taken to hold one lung, which is an error (or a flag). MONAI has no such transform; scikit-image labels components.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from cutremain_monai.data.lung_zones import LungZoneError, split_lung_zones

__all__ = ["LungZoneError", "split_lung_zones", "LungZones", "LungZonesd", "LungZonesD", "LungZonesDict"]

class LungZones(Transform):
    """Array transform: lung mask ``(1, H, W)`` -> zone map ``(1, H, W)`` (values 0..6).

    ``on_error="raise"`` raises :class:`LungZoneError` for a mask with one lung or none; ``"flag"`` returns an
    all-zero map instead (the dictionary version records the flag).
    """

    def __init__(self, on_error: str = "raise"):
        if on_error not in ("raise", "flag"):
            raise ValueError(f"on_error must be 'raise' or 'flag', got {on_error!r}")
        self.on_error = on_error

    def __call__(self, mask):
        try:
            zones = split_lung_zones(mask)
            ok = True
        except LungZoneError:
            if self.on_error == "raise":
                raise
            zones, ok = np.zeros(np.asarray(mask).shape[-2:], dtype=np.uint8), False
        out = torch.as_tensor(zones[None]) if isinstance(mask, torch.Tensor) else zones[None]
        return out, ok


class LungZonesd(MapTransform):
    """Dictionary wrapper of :class:`LungZones`: ``lung_mask`` -> ``zones``; errors name the file."""

    def __init__(
        self,
        keys: KeysCollection = "lung_mask",
        output_key: str = "zones",
        on_error: str = "raise",
        flag_key: str = "zones_ok",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.zoner = LungZones(on_error)
        self.output_key = output_key
        self.flag_key = flag_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[self.output_key], ok = self.zoner(d[key])
            except LungZoneError as e:
                meta = getattr(d[key], "meta", {}) or {}
                name = meta.get("filename_or_obj", d.get(f"{key}_path", key))
                raise LungZoneError(f"{name}: {e}") from e
            d[self.flag_key] = ok
        return d


LungZonesD = LungZonesDict = LungZonesd
