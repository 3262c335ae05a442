"""Box-supervised MONAI transforms: array transforms and their dictionary wrappers (``...d``)."""

from cutremain_monai.transforms.boxes import (
    BoxesToMask,
    BoxesToMaskd,
    BoxesToMaskD,
    BoxesToMaskDict,
    RecordSized,
    SwapBoxAxesd,
    SwapBoxAxesD,
    SwapBoxAxesDict,
    aspect_ratio_boxes,
    boxes_to_mask,
)
from cutremain_monai.transforms.cut_remain import CutRemain, CutRemaind, CutRemainD, CutRemainDict, gamma_selected
from cutremain_monai.transforms.hide_and_seek import HideAndSeek, HideAndSeekd, HideAndSeekD, HideAndSeekDict, dataset_mean
from cutremain_monai.transforms.severity_preprocess import GaussianBlur3x3, GaussianBlur3x3d, LungMask, LungMaskd
from cutremain_monai.transforms.patches import (
    RandPatches,
    RandPatchesd,
    RandPatchesD,
    RandPatchesDict,
    background_plan,
    patch_type,
)
from cutremain_monai.transforms.lung_zones import LungZones, LungZonesd, LungZonesD, LungZonesDict, split_lung_zones
from cutremain_monai.transforms.pseudo_labels import (
    ApplyPseudoLabelsd,
    ApplyPseudoLabelsD,
    ApplyPseudoLabelsDict,
    DefaultLabelMapd,
    LabelMap,
    LabelMapd,
    LabelMapD,
    LabelMapDict,
    PseudoLabelBank,
)
from cutremain_monai.transforms.relevant_area import (
    BODY_MASK,
    RELEVANT_AREA,
    BodyMaskd,
    BodyMaskD,
    BodyMaskDict,
    RelevantAreaBoxesd,
    RelevantAreaBoxesD,
    RelevantAreaBoxesDict,
    body_mask,
    lesion_box_fractions,
)
from cutremain_monai.transforms.resize import ResizeWithBoxesd, ResizeWithBoxesD, ResizeWithBoxesDict, resize_boxes
from cutremain_monai.transforms.split_halves import SplitHalves, SplitHalvesd, SplitHalvesD, SplitHalvesDict
from cutremain_monai.transforms.sup_mix import (
    SupCutmix,
    SupCutmixd,
    SupCutmixD,
    SupCutmixDict,
    SupCutout,
    SupCutoutd,
    SupCutoutD,
    SupCutoutDict,
    SupMixup,
    SupMixupd,
    SupMixupD,
    SupMixupDict,
)

__all__ = [
    "BoxesToMask", "BoxesToMaskd", "BoxesToMaskD", "BoxesToMaskDict", "RecordSized", "SwapBoxAxesd", "SwapBoxAxesD",
    "SwapBoxAxesDict", "aspect_ratio_boxes", "boxes_to_mask",
    "GaussianBlur3x3", "GaussianBlur3x3d", "LungMask", "LungMaskd",
    "CutRemain", "CutRemaind", "CutRemainD", "CutRemainDict", "gamma_selected",
    "HideAndSeek", "HideAndSeekd", "HideAndSeekD", "HideAndSeekDict", "dataset_mean",
    "LungZones", "LungZonesd", "LungZonesD", "LungZonesDict", "split_lung_zones",
    "RELEVANT_AREA", "RelevantAreaBoxesd", "RelevantAreaBoxesD", "RelevantAreaBoxesDict", "body_mask",
    "BODY_MASK", "BodyMaskd", "BodyMaskD", "BodyMaskDict",
    "lesion_box_fractions",
    "ResizeWithBoxesd", "ResizeWithBoxesD", "ResizeWithBoxesDict", "resize_boxes",
    "SplitHalves", "SplitHalvesd", "SplitHalvesD", "SplitHalvesDict",
    "SupCutmix", "SupCutmixd", "SupCutmixD", "SupCutmixDict", "SupCutout", "SupCutoutd", "SupCutoutD",
    "SupCutoutDict", "SupMixup", "SupMixupd", "SupMixupD", "SupMixupDict",
    "LabelMap", "LabelMapd", "LabelMapD", "LabelMapDict", "PseudoLabelBank", "DefaultLabelMapd", "ApplyPseudoLabelsd", "ApplyPseudoLabelsD",
    "ApplyPseudoLabelsDict",
    "RandPatches", "RandPatchesd", "RandPatchesD", "RandPatchesDict", "background_plan", "patch_type",
]
