"""Dictionary keys and fixed vocabularies shared by the whole package (one place, no string literals elsewhere)."""

IMAGE = "image"
LABEL = "label"
BOXES = "boxes"
BOX_LABELS = "box_labels"
BOX_MASK = "box_mask"
BODY_MASK = "body_mask"  # the body (Otsu, largest component): a guidance foreground for lesion-box data (issue 30)
RELEVANT_AREA = "relevant_area"  # box label of a region that decides the label, never a finding (issues 28, 30)
LUNG_MASK = "lung_mask"
ZONES = "zones"
ZONE_SCORES = "zone_scores"
GROUP = "group"  # pseudonymous grouping key (never a patient identifier) used for patient-wise splits

SEG_LABEL = "seg_label"  # a pseudo-mask label map: 0 background, c + 1 class c, IGNORE_LABEL unknown
IGNORE_LABEL = 255

BOX_MODE = "xyxy"

DATALIST_SECTIONS = ("training", "validation", "test")

# NIH ChestX-ray14 findings, in the order of Wang et al. (CVPR 2017) / the CheXNet papers.
CXR14_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
# The 8 findings that BBox_List_2017 annotates with boxes ("Infiltrate" there means Infiltration).
CXR14_BOXED_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax")

# Brixia zones: A/B/C upper/middle/lower of the image-left lung, D/E/F of the image-right lung.
BRIXIA_ZONES = ("A", "B", "C", "D", "E", "F")
