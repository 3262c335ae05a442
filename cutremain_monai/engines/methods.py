"""The method vocabulary: which augmentations and guidances a classification bundle switches on, and the names the
study runners and the CLI use for a training recipe (``cut_remain``, ``isnet``, ``cut_remain+isnet_free``...) with
the bundle overrides each one means. One list, used by ``compare``, the shortcut test, severity guidance, the
bundles' own check of their ``augmentation`` switch and ``cutremain experiment``'s help.

The transforms themselves are switched in the bundles' ``train.yaml`` (``augmentation_transforms`` and
``batch_augmentations``, keyed by the same names); this module only names them.
"""

from __future__ import annotations

__all__ = ["AUGMENTATIONS", "AUGMENTATION_VARIANTS", "GUIDANCES", "GUIDANCE_VARIANTS", "check_augmentation", "check_guidance", "method_overrides",
           "method_names"]

AUGMENTATIONS = ("none", "cut_remain", "sup_cutout", "sup_mixup", "sup_cutmix", "hide_and_seek")
GUIDANCES = ("none", "gain", "isnet")
# named augmentation settings beyond the switch: "cut_remain_ra", Cut&Remain with relevant-area boxes on the
# training images that box no lesion (transforms/relevant_area.py; the premise of issue 28 where only lesions are boxed)
# "sup_mixup_p50": supervised Mixup on half of the boxed samples (mixup_prob 0.5), the others stay whole images;
# "sup_mixup_ra_p50": the same with relevant-area boxes, so normal images are mixed too (FracAtlas: with every
# boxed sample mixed, the Mixup model never sees a whole fractured radiograph; clavicle docs)
AUGMENTATION_VARIANTS = {
    "cut_remain_ra": {"augmentation": "cut_remain", "relevant_area_boxes": True},
    "sup_mixup_p50": {"augmentation": "sup_mixup", "mixup_prob": 0.5},
    "sup_mixup_ra_p50": {"augmentation": "sup_mixup", "mixup_prob": 0.5, "relevant_area_boxes": True},
}
# named guidance settings beyond the switch, for the protocol study of the shortcut test (clavicle docs):
# "isnet_free": ISNet without gradient clipping (clipped at norm 1, the heatmap loss's gradient, ~50 times the
# classification loss's, leaves the classifier nearly where it starts in a short run); "isnet_batchstats": without
# clipping and with BatchNorm's batch statistics in the graph of the maps; "isnet_v1": the defaults before issue 30
# (no restart after the warm-up, batch statistics in the graph, GWRP decay 0 (max); their model.pt was the best
# validation AUC, which the shortcut study reports for every run); "isnet_body" / "gain_body": guidance kept in
# the Otsu body mask instead of the lesion boxes (guidance_mask body_mask: for data sets that box only small
# lesions, where a box-mask foreground is ~1% of the image; ISNet's references use the lungs, not the lesion)
GUIDANCE_VARIANTS = {
    "isnet_free": {"guidance": "isnet", "clip_grad_norm": None},
    "isnet_batchstats": {"guidance": "isnet", "clip_grad_norm": None, "guidance_batchnorm": "batch"},
    "isnet_v1": {"guidance": "isnet", "guidance_restart": False, "guidance_batchnorm": "batch", "isnet_decay": 0.0},
    "gain_v1": {"guidance": "gain", "guidance_restart": False, "guidance_batchnorm": "batch"},
    "isnet_body": {"guidance": "isnet", "guidance_mask": "body_mask"},
    "gain_body": {"guidance": "gain", "guidance_mask": "body_mask"},
}


def check_augmentation(name: str) -> str:
    """``name`` when it is a known augmentation, else a ``ValueError`` listing them (the bundles call it first:
    their configs switch transforms on by name, and a misspelt name would otherwise train without one)."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}; got {name!r}")
    return name


def check_guidance(name: str, supported=GUIDANCES) -> str:
    """``name`` when it is a guidance the caller supports (``supported``, a subset of :data:`GUIDANCES`), else a
    ``ValueError`` listing them."""
    if name not in supported or name not in GUIDANCES:
        raise ValueError(f"guidance must be one of {', '.join(g for g in supported if g in GUIDANCES)}; got {name!r}")
    return name


def method_names() -> list[str]:
    """Every single-part method name: the augmentations, the guidances and their named variants."""
    return list(dict.fromkeys([*AUGMENTATIONS, *AUGMENTATION_VARIANTS, *GUIDANCES[1:], *GUIDANCE_VARIANTS]))


def method_overrides(method: str, augmentation: bool = True) -> dict:
    """Bundle overrides of a method name: an augmentation (``cut_remain``), a guidance (``gain``, ``isnet``) or a
    named variant (``cut_remain_ra``, ``isnet_free``), or an augmentation and a guidance joined by ``+``
    (``cut_remain+isnet``). ``augmentation=False`` for bundles without an augmentation switch (COVID severity):
    augmentation names are refused there and the key is left out."""
    aug, guidance, extra, aug_extra = "none", "none", {}, {}
    parts = [p.strip() for p in method.split("+") if p.strip()]
    if not parts or len(parts) > 2:
        raise ValueError(f"method {method!r}: an augmentation, a guidance, or augmentation+guidance")
    for p in parts:
        if p in AUGMENTATIONS and p != "none" and augmentation and aug == "none":
            aug = p
        elif p in AUGMENTATION_VARIANTS and augmentation and aug == "none":
            aug_extra = dict(AUGMENTATION_VARIANTS[p])
            aug = aug_extra.pop("augmentation")
        elif p in GUIDANCES and p != "none" and guidance == "none":
            guidance = p
        elif p in GUIDANCE_VARIANTS and guidance == "none":
            extra = dict(GUIDANCE_VARIANTS[p])
            guidance = extra.pop("guidance")
        elif p == "none":
            pass
        else:
            allowed = [*((*AUGMENTATIONS, *AUGMENTATION_VARIANTS) if augmentation else ("none",)), *GUIDANCES[1:],
                       *GUIDANCE_VARIANTS]
            raise ValueError(f"method {method!r}: {p!r} is not one of the methods here ({', '.join(allowed)}), "
                             "or names a second augmentation or guidance")
    out = {"augmentation": aug, **aug_extra} if augmentation else {}
    return {**out, "guidance": guidance, **extra}
