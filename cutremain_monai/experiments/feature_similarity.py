"""The Cut&Remain paper's feature-similarity study (Table 6), the data side: (original, augmented) pairs of boxed
samples made by a bundle's own chain, at the network's input size. The distances are
:func:`cutremain_monai.metrics.feature_similarity.feature_distances`.

The augmentation is the bundle's (its ``augmentation_transforms`` with ``augmentation`` set), so the pairs are
exactly what training sees; only per-sample augmentations make pairs (``cut_remain`` with one drawn copy,
``sup_cutout``, ``hide_and_seek``), and samples without boxes are skipped (their Cut&Remain copy does not exist).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import Compose, Randomizable

from cutremain_monai.engines.bundle import bundle_parser

__all__ = ["augmentation_pairs"]


def augmentation_pairs(bundle: str, items: list[dict], augmentation: str, image_size: Sequence[int], seed: int = 0,
                       max_pairs: int = 32, configs: Sequence[str] = ("train.yaml", "cpu.yaml"), **overrides) -> list:
    """Up to ``max_pairs`` (original, augmented) image tensors ``(1, *image_size)`` for ``items`` through the
    ``bundle``'s ``head_transforms`` (halves, resized to ``image_size`` with the boxes, box masks) and
    ``augmentation_transforms``: the pairs training makes."""
    parser = bundle_parser(bundle, configs, **{**overrides, "augmentation": augmentation, "num_copies": 1, "seed": seed,
                                               "image_size": list(image_size)})
    load = Compose(parser.get_parsed_content("head_transforms"))
    augs = parser.get_parsed_content("augmentation_transforms")
    if not augs:
        raise ValueError(f"augmentation {augmentation!r} has no per-sample transform in {bundle}")
    for a in augs:
        if isinstance(a, Randomizable):
            a.set_random_state(seed)
    pairs = []
    for it in items:
        d = load(dict(it))
        for s in d if isinstance(d, list) else [d]:
            if len(s["boxes"]) == 0:
                continue
            out = s
            for a in augs:
                out = a(out)
            copy = out[-1] if isinstance(out, list) else out
            if copy is s:
                continue
            # the head ends at image_size: the pair is already at the network's input size
            pairs.append((torch.as_tensor(s["image"]).as_subclass(torch.Tensor),
                          torch.as_tensor(copy["image"]).as_subclass(torch.Tensor)))
            if len(pairs) >= max_pairs:
                return pairs
    return pairs
