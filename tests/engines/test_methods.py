"""The method vocabulary: names -> bundle overrides, one list for compare, the shortcut test, severity guidance and
the CLI."""

import pytest

from cutremain_monai.engines.methods import (AUGMENTATIONS, GUIDANCES, check_augmentation, check_guidance, method_names,
                                             method_overrides)


def test_method_overrides():
    assert method_overrides("none") == {"augmentation": "none", "guidance": "none"}
    assert method_overrides("isnet") == {"augmentation": "none", "guidance": "isnet"}
    assert method_overrides("cut_remain+gain") == {"augmentation": "cut_remain", "guidance": "gain"}
    assert method_overrides("none+isnet") == {"augmentation": "none", "guidance": "isnet"}
    with pytest.raises(ValueError, match="'mixup' is not one of the methods here"):
        method_overrides("mixup")
    with pytest.raises(ValueError, match="'cut_remain' is not one"):
        method_overrides("cut_remain+cut_remain")
    with pytest.raises(ValueError, match="an augmentation, a guidance, or augmentation\\+guidance"):
        method_overrides("cut_remain+gain+isnet")


def test_guidance_variants_carry_their_settings():
    """The shortcut test's protocol variants: isnet_free (no gradient clipping), isnet_batchstats (and BatchNorm's
    batch statistics in the graph), isnet_v1 / gain_v1 (the defaults before issue 30)."""
    free = {"guidance": "isnet", "clip_grad_norm": None}
    assert method_overrides("isnet_free") == {"augmentation": "none", **free}
    assert method_overrides("cut_remain+isnet_free") == {"augmentation": "cut_remain", **free}
    assert method_overrides("isnet_batchstats") == {"augmentation": "none", **free, "guidance_batchnorm": "batch"}
    body = {"guidance_mask": "body_mask"}  # guidance kept in the body, not in the (small) lesion boxes
    assert method_overrides("isnet_body") == {"augmentation": "none", "guidance": "isnet", **body}
    assert method_overrides("cut_remain_ra+gain_body") == {"augmentation": "cut_remain", "relevant_area_boxes": True,
                                                           "guidance": "gain", **body}
    v1 = method_overrides("gain_v1")
    assert v1 == {"augmentation": "none", "guidance": "gain", "guidance_restart": False, "guidance_batchnorm": "batch"}
    assert method_overrides("isnet_v1")["isnet_decay"] == 0.0
    # the augmentation variant: Cut&Remain with relevant-area boxes (issue 28), alone or with a guidance
    ra = {"augmentation": "cut_remain", "relevant_area_boxes": True}
    assert method_overrides("cut_remain_ra") == {**ra, "guidance": "none"}
    assert method_overrides("cut_remain_ra+isnet") == {**ra, "guidance": "isnet"}
    assert method_overrides("sup_mixup_ra_p50") == {"augmentation": "sup_mixup", "mixup_prob": 0.5,
                                                     "relevant_area_boxes": True, "guidance": "none"}
    with pytest.raises(ValueError, match="names a second augmentation"):
        method_overrides("cut_remain+cut_remain_ra")
    with pytest.raises(ValueError, match="'isnet' is not one"):
        method_overrides("isnet_free+isnet")


def test_bundles_without_an_augmentation_switch():
    """COVID severity has no augmentation switch: the key is left out and augmentation names are refused."""
    assert method_overrides("isnet", augmentation=False) == {"guidance": "isnet"}
    assert method_overrides("none", augmentation=False) == {"guidance": "none"}
    with pytest.raises(ValueError, match="'cut_remain' is not one of the methods here \\(none, gain, isnet, isnet_free, isnet_batchstats"):
        method_overrides("cut_remain", augmentation=False)


def test_checks_and_names():
    assert check_augmentation("sup_cutmix") == "sup_cutmix"
    with pytest.raises(ValueError, match="augmentation must be one of none, cut_remain"):
        check_augmentation("cutmix")
    assert check_guidance("isnet", ("none", "isnet")) == "isnet"
    with pytest.raises(ValueError, match="guidance must be one of none, isnet; got 'gain'"):
        check_guidance("gain", ("none", "isnet"))
    names = method_names()
    assert names[: len(AUGMENTATIONS)] == list(AUGMENTATIONS) and set(GUIDANCES) <= set(names) and "isnet_free" in names
    for name in names:  # every listed name is accepted
        method_overrides(name)
