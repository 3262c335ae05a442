"""The bundle's ``augmentation`` switch: one name -> the per-sample transforms and the batch-level transform.

``none | cut_remain | sup_cutout | sup_mixup | sup_cutmix | hide_and_seek``. Per-sample transforms run on the
native-resolution sample (boxes in its pixels) before resizing; batch-level ones run in the ``prepare_batch``.
"""

from __future__ import annotations

from collections.abc import Sequence

from cutremain_monai.transforms import CutRemaind, HideAndSeekd, SupCutmixd, SupCutoutd, SupMixupd
from cutremain_monai.transforms.boxes import ASPECT_FACTORS

__all__ = ["AUGMENTATIONS", "check_augmentation", "sample_augmentation", "batch_augmentation"]

AUGMENTATIONS = ("none", "cut_remain", "sup_cutout", "sup_mixup", "sup_cutmix", "hide_and_seek")


def check_augmentation(name: str) -> str:
    """``name`` when it is a known augmentation, else a ``ValueError`` listing them (the bundles call it first:
    their configs switch transforms on by name, and a misspelt name would otherwise train without one)."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}; got {name!r}")
    return name


_check = check_augmentation


def sample_augmentation(
    name: str,
    factors: Sequence[float] = ASPECT_FACTORS,
    num_copies: int | None = None,
    gamma: float = 1.0,
    seed: int = 0,
    hide_and_seek_mean: float = 0.5,
    hide_and_seek_grid: Sequence[int] = (0, 16, 32, 44, 56),
    cutout_size: Sequence[float] = (0.2, 0.4),
) -> list:
    """Per-sample transforms for ``name`` (an empty list when it has none)."""
    name = _check(name)
    if name == "cut_remain":
        return [CutRemaind("image", factors=factors, num_copies=num_copies, gamma=gamma, seed=seed)]
    if name == "sup_cutout":
        return [SupCutoutd("image", size=cutout_size)]
    if name == "hide_and_seek":
        return [HideAndSeekd("image", mean=hide_and_seek_mean, grid_sizes=hide_and_seek_grid)]
    return []


def batch_augmentation(name: str, mixup_alpha: float = 1.0, cutmix_label_rule: str = "paper"):
    """The batch-level transform for ``name`` (``SupMixupd`` / ``SupCutmixd``), or None."""
    name = _check(name)
    if name == "sup_mixup":
        return SupMixupd("image", alpha=mixup_alpha)
    if name == "sup_cutmix":
        return SupCutmixd("image", label_rule=cutmix_label_rule)
    return None
