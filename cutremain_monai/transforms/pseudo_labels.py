"""Pseudo-mask label maps in the training chain of the lesion-segmentation bundle.

- :class:`LabelMap` / :class:`LabelMapd`: a label map stored as an 8-bit PNG (0 background, ``c + 1`` class ``c``,
  255 ignore; :mod:`cutremain_monai.localization.pseudo_masks`) read with its stored integers, as float so that
  ``Resized(mode="nearest")`` and flips keep it exact.
- :class:`DefaultLabelMapd`: the map of an item that has none, from its image label (all background or all ignore).
- :class:`PseudoLabelBank`: the refreshed pseudo-masks at the network's input size, by ``image_id``, written by
  :class:`~cutremain_monai.handlers.RefreshPseudoLabels` (PSL's online update) and checkpointed with the model
  (``state_dict`` / ``load_state_dict``).
- :class:`ApplyPseudoLabels` / :class:`ApplyPseudoLabelsd`: replace a sample's label map by the bank's when the bank
  holds one (placed after the deterministic resize, before random flips, so the flip applies to the refreshed map).

Data loader workers fork at the start of each epoch, so they see the bank as it was when the epoch began; the bank
is refreshed between epochs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTrait, Transform

from cutremain_monai.constants import IGNORE_LABEL, SEG_LABEL

__all__ = ["LabelMap", "LabelMapd", "LabelMapD", "LabelMapDict", "DefaultLabelMapd", "PseudoLabelBank", "bank_key", "ApplyPseudoLabels",
           "ApplyPseudoLabelsd", "ApplyPseudoLabelsD", "ApplyPseudoLabelsDict"]


class LabelMap(Transform):
    """A label map: a path (8- or 16-bit PNG / TIFF / BMP, or ``.npy``, read with its stored integers, no scaling)
    or an array ``(H, W)`` / ``(1, H, W)`` of integers -> float ``(1, H, W)``. Values must be 0 .. ``num_classes`` or
    255 (ignore), else ``ValueError`` naming the file and the values. (Not through ``LoadXrayd``: its [0, 1]
    scaling cannot tell an 8-bit ``{0, 255}`` map from a ``{0, 1}`` one.)"""

    def __init__(self, num_classes: int = 1) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes

    def __call__(self, label):
        where = ""
        if isinstance(label, (str, os.PathLike)):
            where = f"{os.fspath(label)}: "
            try:
                if os.fspath(label).endswith(".npy"):
                    a = np.load(label)
                else:
                    from PIL import Image

                    with Image.open(label) as im:
                        a = np.asarray(im)
            except OSError as e:
                raise ValueError(f"{where}field 'seg_label' cannot be read ({type(e).__name__}: {e})") from e
            label = a
        t = torch.as_tensor(np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label), dtype=torch.float32)
        t = t[None] if t.ndim == 2 else t
        if t.ndim != 3 or t.shape[0] != 1:
            raise ValueError(f"{where}a label map must be (H, W) or (1, H, W), got shape {tuple(t.shape)}")
        values = set(torch.unique(t).tolist())
        bad = sorted(v for v in values if v != IGNORE_LABEL and not (0 <= v <= self.num_classes and v == int(v)))
        if bad:
            raise ValueError(f"{where}field 'seg_label' holds {bad[:5]}; expected 0 (background), 1..{self.num_classes} "
                             f"(classes) or {IGNORE_LABEL} (ignore)")
        return t


class LabelMapd(MapTransform):
    """Dictionary wrapper of :class:`LabelMap`."""

    def __init__(self, keys: KeysCollection = SEG_LABEL, num_classes: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.to_labels = LabelMap(num_classes)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.to_labels(d[key])
        return d


class DefaultLabelMapd(MapTransform):
    """A label map for an item that has none, from its image label: an image without a positive class is background
    everywhere (0); one with a positive class is ignored everywhere (255: where its lesion lies is unknown, so only
    its image label and PSL's refresh teach from it). Items with a map, and items without a label (inference), are
    unchanged. The map has the size of ``ref_key``'s image ``(1, H, W)``."""

    def __init__(self, keys: KeysCollection = SEG_LABEL, ref_key: str = "image", label_key: str = "label") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.ref_key, self.label_key = ref_key, label_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.label_key not in d:
            return d
        for key in self.keys:
            if d.get(key) is not None:
                continue
            y = np.asarray(torch.as_tensor(d[self.label_key]).cpu(), dtype=float).reshape(-1)
            value = float(IGNORE_LABEL) if (y > 0.5).any() else 0.0
            ref = torch.as_tensor(d[self.ref_key])
            d[key] = torch.full((1, *ref.shape[-2:]), value, dtype=torch.float32)
        return d


def bank_key(path) -> str:
    """The bank's key of an image: a digest of its path, so checkpoints hold no file path (paths can carry patient
    names); the same path gives the same key on resume."""
    return hashlib.sha256(os.fspath(str(path)).encode()).hexdigest()[:20]


class PseudoLabelBank:
    """Refreshed label maps ``(H, W)`` uint8 by image (:func:`bank_key` of its path; module doc)."""

    def __init__(self) -> None:
        self.maps: dict[str, torch.Tensor] = {}
        self.refreshes = 0

    def __len__(self) -> int:
        return len(self.maps)

    def __contains__(self, path) -> bool:
        return bank_key(path) in self.maps

    def get(self, path):
        return self.maps.get(bank_key(path))

    def update(self, path, label) -> None:
        a = np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label)
        if a.ndim != 2:
            raise ValueError(f"a label map must be (H, W), got shape {a.shape}")
        self.maps[bank_key(path)] = torch.as_tensor(a.astype(np.uint8))

    def state_dict(self) -> dict:
        return {"maps": dict(self.maps), "refreshes": self.refreshes}

    def load_state_dict(self, state: dict) -> None:
        self.maps = {str(k): torch.as_tensor(v, dtype=torch.uint8) for k, v in state.get("maps", {}).items()}
        self.refreshes = int(state.get("refreshes", 0))


class ApplyPseudoLabels(Transform):
    """``label (1, H, W)`` -> the bank's map for ``key`` when it holds one (same size required), else unchanged."""

    def __init__(self, bank: PseudoLabelBank) -> None:
        self.bank = bank

    def __call__(self, label, key):
        stored = self.bank.get(key)
        if stored is None:
            return label
        if tuple(stored.shape) != tuple(label.shape[-2:]):
            raise ValueError(f"the refreshed label map of {key} is {tuple(stored.shape)} but the sample's is "
                             f"{tuple(label.shape[-2:])}: the bank is filled at the network's input size")
        out = stored.to(torch.float32)[None]
        if isinstance(label, MetaTensor):
            return MetaTensor(out, meta=label.meta, applied_operations=label.applied_operations)
        return out


class ApplyPseudoLabelsd(MapTransform, RandomizableTrait):
    """Dictionary wrapper of :class:`ApplyPseudoLabels`; the bank key is ``d[id_key]``.

    Marked ``RandomizableTrait`` (it draws nothing) so that MONAI's ``CacheDataset`` stops caching before it: its
    output changes between epochs, when the bank is refreshed."""

    def __init__(self, keys: KeysCollection = SEG_LABEL, bank: PseudoLabelBank | None = None, id_key: str = "image_path",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if bank is None:
            raise ValueError("ApplyPseudoLabelsd needs the bank that the refresh handler fills")
        self.apply = ApplyPseudoLabels(bank)
        self.id_key = id_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.id_key not in d:
                raise KeyError(f"ApplyPseudoLabelsd: the sample has no '{self.id_key}' to find its refreshed map")
            d[key] = self.apply(d[key], d[self.id_key])
        return d


LabelMapD = LabelMapDict = LabelMapd
ApplyPseudoLabelsD = ApplyPseudoLabelsDict = ApplyPseudoLabelsd
