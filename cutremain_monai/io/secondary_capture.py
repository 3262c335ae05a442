"""A model's picture of an image as DICOM Secondary Capture (RGB), for PACS viewers that show no SR or GSPS.

What this adds to highdicom's ``SCImage``: the burned-in caption every such picture must carry (a line that says
it is a model output, which model and version, and the finding), drawn onto the pixels and declared with
``BurnedInAnnotation = YES``; the source image's patient and study modules (the PACS files it with the study) and
nothing else of it; a reference to the source image (Source Image Sequence) and derivation description. The
overlay itself (heatmap and boxes) is drawn by the caller
(:func:`cutremain_monai.localization.cam.overlay_image`): this module only writes pixels it is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cutremain_monai.io.dicom import drop_source_equipment

__all__ = ["write_secondary_capture", "burn_caption"]

CAPTION_PREFIX = "MODEL OUTPUT, NOT A DIAGNOSIS"


def burn_caption(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 with ``lines`` written on a dark band added above the image (the image pixels
    are not covered); returns the taller array."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = rgb.shape[:2]
    size = max(9, min(48, w // 40))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = []
    for line in lines:  # wrap at spaces so every word is on the picture, however narrow the image
        words, cur = line.split(" "), ""
        for word in words:
            trial = f"{cur} {word}".strip()
            if cur and measure.textlength(trial, font=font) > w - 8:
                wrapped.append(cur)
                cur = word
            else:
                cur = trial
        wrapped.append(cur)
    band = (size + 4) * len(wrapped) + 4
    canvas = Image.new("RGB", (w, h + band), (0, 0, 0))
    canvas.paste(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)), (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(wrapped):
        draw.text((4, 2 + i * (size + 4)), line, fill=(255, 255, 0), font=font)
    return np.asarray(canvas)


def write_secondary_capture(
    image_ds,
    rgb: np.ndarray,
    caption: Sequence[str],
    path: str | os.PathLike | None = None,
    manufacturer: str = "cutremain_monai",
    model_name: str = "cutremain_monai",
    software_version: str = "0.1.0",
    series_number: int = 902,
    series_description: str = "cutremain overlay",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
):
    """An RGB Secondary Capture of ``rgb`` (H, W, 3 uint8: the overlay) with ``caption`` burned in above it
    (its first line always :data:`CAPTION_PREFIX`), for the study of ``image_ds``; returned and saved to ``path``."""
    import highdicom as hd
    from pydicom.dataset import Dataset


    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    lines = [CAPTION_PREFIX] + [str(c) for c in caption if str(c)]
    pixels = burn_caption(rgb, lines)
    orientation = image_ds.get("PatientOrientation")
    orientation = tuple(str(v) for v in orientation) if orientation and len(orientation) == 2 else ("L", "F")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=image_ds, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_instance_uid or hd.UID(), series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(), instance_number=instance_number, manufacturer=manufacturer,
        patient_orientation=orientation, transfer_syntax_uid="1.2.840.10008.1.2.1")
    drop_source_equipment(sc)  # (highdicom copies the source's institution, station and equipment record)
    if "Laterality" not in sc:  # General Series 2C: present (empty) when the image has no paired-part laterality
        sc.Laterality = image_ds.get("Laterality") or None
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.SeriesDescription = series_description[:64]
    sc.ManufacturerModelName = model_name[:64]
    sc.SoftwareVersions = str(software_version)[:64]
    sc.DerivationDescription = ("; ".join(lines))[:1024]
    sc.ImageType = ["DERIVED", "SECONDARY"]
    src = Dataset()
    src.ReferencedSOPClassUID = image_ds.SOPClassUID
    src.ReferencedSOPInstanceUID = image_ds.SOPInstanceUID
    sc.SourceImageSequence = [src]
    if path is not None:
        sc.save_as(os.fspath(path), enforce_file_format=True)
    return sc
