"""A binary mask of a projection X-ray as DICOM Segmentation (the lungs that COVID severity scored in, or the
lesion mask of the lesion-segmentation bundle).

What this adds to highdicom's ``Segmentation``: the settings a 2D X-ray needs and nothing else (one frame, no
frame of reference, the source's Patient Orientation, or empty when it has none, as General Image's Type 2C asks),
the segment described as the model's automatic output (algorithm identification = the model), and the mask
brought to the stored image's size first (nearest neighbour: it stays binary).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["write_mask_seg", "read_mask_seg"]


def _to_size(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    mask = np.asarray(mask).squeeze() > 0
    if mask.shape == shape:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((shape[1], shape[0]), Image.NEAREST)) > 127


def write_mask_seg(image_ds, mask: np.ndarray, path: str | os.PathLike | None = None, label: str = "lungs",
                   model_name: str = "cutremain_monai", version: str = "0.1.0", manufacturer: str = "cutremain_monai",
                   series_number: int = 904, series_description: str = "cutremain lung mask",
                   sop_instance_uid: str | None = None, series_instance_uid: str | None = None,
                   property_category=None, property_type=None, instance_number: int = 1):
    """A binary Segmentation of ``mask`` (any size: resized to the image) on ``image_ds``; returned and saved.
    ``property_category`` / ``property_type``: the segment's codes (default SCT Organ / Lung; a lesion mask passes
    SCT Morphologically Abnormal Structure / Lesion)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    shape = (int(image_ds.Rows), int(image_ds.Columns))
    pixels = _to_size(mask, shape)
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label[:64], segmented_property_category=property_category or codes.SCT.Organ,
        segmented_property_type=property_type or codes.SCT.Lung, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model_name[:64], version=str(version)[:64], family=codes.DCM.ArtificialIntelligence))
    seg = hd.seg.Segmentation(
        source_images=[image_ds], pixel_array=pixels[None], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=series_instance_uid or hd.UID(), series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(), instance_number=instance_number, manufacturer=manufacturer,
        manufacturer_model_name=model_name[:64], software_versions=str(version)[:64], device_serial_number="0",
        series_description=series_description[:64])
    if "PatientOrientation" not in seg:
        orientation = image_ds.get("PatientOrientation")
        seg.PatientOrientation = list(orientation) if orientation else None
    if path is not None:
        seg.save_as(os.fspath(path), enforce_file_format=True)
    return seg


def read_mask_seg(path_or_ds) -> np.ndarray:
    """The (H, W) boolean mask of a one-segment, one-frame binary Segmentation."""
    import highdicom as hd
    import pydicom

    ds = path_or_ds if isinstance(path_or_ds, pydicom.Dataset) else pydicom.dcmread(os.fspath(path_or_ds))
    seg = hd.seg.Segmentation.from_dataset(ds)
    return np.asarray(seg.pixel_array).reshape(int(ds.Rows), int(ds.Columns)) > 0
