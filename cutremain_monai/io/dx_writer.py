"""Write a Digital X-Ray (DX, For Presentation) image that ``dciodvfy`` accepts without errors.

pydicom writes any dataset; this module adds the DX Image IOD's required modules (PS3.3 A.26.1: Patient, General
Study, DX Series, General Equipment, General Image, Image Pixel, DX Anatomy Imaged, DX Image, DX Detector, VOI LUT,
Acquisition Context, SOP Common) and compression through pydicom's encoders (RLE, JPEG-LS, JPEG 2000 lossless).
Patient attributes are left empty (type 2): nothing identifying is written.
"""

from __future__ import annotations


import numpy as np
from monai.config import PathLike
from monai.utils import optional_import

pydicom, _ = optional_import("pydicom")

__all__ = ["DX_SOP_CLASS_UID", "ANATOMY_CODES", "make_uid", "write_dx"]

DX_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
# SNOMED CT codes for the Anatomic Region Sequence (CID 4009).
ANATOMY_CODES = {
    "chest": ("51185008", "Thorax"),
    "clavicle": ("51299004", "Clavicle"),
    "pelvis": ("12921003", "Pelvis"),
}
_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "rle": "1.2.840.10008.1.2.5",
    "jpegls": "1.2.840.10008.1.2.4.80",
    "j2k": "1.2.840.10008.1.2.4.90",
}


def make_uid(*parts) -> str:
    """A deterministic ``2.25.<128-bit int>`` UID (PS3.5 B.2) from a SHA-256 of ``parts``.

    (pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources and is random.)
    """
    import hashlib

    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()[:16]
    return "2.25." + str(int.from_bytes(digest, "big"))


def write_dx(
    path: PathLike,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    compression: str = "explicit",
    window: tuple[float, float] | None = None,
    anatomy: str = "chest",
    view_position: str = "PA",
    laterality: str = "B",
    pixel_spacing: float = 0.5,
    uid_seed: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_number: int = 1,
    content_date: str = "20260101",
    patient_name: str = "",
    patient_id: str = "",
    patient_birth_date: str = "",
):
    """Write stored values ``pixels`` (``(H, W)`` unsigned integers < 2**bits_stored) as a DX file.

    ``compression`` is one of ``explicit`` (uncompressed), ``rle``, ``jpegls``, ``j2k`` (all lossless).
    ``patient_name`` / ``patient_id`` default to empty (type 2); the phantom generator sets a synthetic,
    non-identifying value because presentation-state checkers (``dcmpschk``) want a patient name.
    Returns the written dataset (pixel data as written).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as Seq

    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if compression not in _SYNTAXES:
        raise ValueError(f"compression must be one of {sorted(_SYNTAXES)}, got {compression!r}")
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be (H, W), got {pixels.shape}")
    if not 8 < bits_stored <= 16:
        raise ValueError(f"bits_stored must be in 9..16, got {bits_stored}")
    if pixels.min() < 0 or pixels.max() >= 2**bits_stored:
        raise ValueError(f"pixel values must lie in [0, {2**bits_stored - 1}]")
    sop_uid = make_uid("sop", uid_seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_SOP_CLASS_UID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = _SYNTAXES["explicit"]
    ds.file_meta.ImplementationClassUID = make_uid("cutremain_monai", "implementation")
    ds.file_meta.ImplementationVersionName = "CUTREMAIN_010"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    # Patient (type 2; empty unless the caller gives a synthetic value: we never write identifiers)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = ""
    # General Study
    ds.StudyInstanceUID = study_uid or make_uid("study", uid_seed)
    ds.StudyDate = content_date
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    # General Series + DX Series
    ds.Modality = "DX"
    ds.SeriesInstanceUID = series_uid or make_uid("series", uid_seed)
    ds.SeriesNumber = 1
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = {"chest": "CHEST", "clavicle": "CLAVICLE", "pelvis": "PELVIS"}.get(anatomy, "")
    # General Equipment
    ds.Manufacturer = "cutremain_monai synthetic phantom"
    # General Image + DX Image
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["L", "F"] if view_position in ("PA", "") else ["R", "F"]
    ds.ContentDate = content_date
    ds.ContentTime = "120000"
    ds.ImageType = ["DERIVED", "PRIMARY", ""]
    ds.DerivationDescription = "synthetic phantom generated by cutremain_monai.data.phantoms"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    if window is None:
        top = 2**bits_stored - 1
        window = (top / 2.0, float(top))
    ds.WindowCenter = f"{window[0]:g}"
    ds.WindowWidth = f"{window[1]:g}"
    ds.VOILUTFunction = "LINEAR"
    # DX Anatomy Imaged
    ds.ImageLaterality = laterality
    code, meaning = ANATOMY_CODES[anatomy]
    region = Dataset()
    region.CodeValue = code
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = meaning
    ds.AnatomicRegionSequence = Seq([region])
    # DX Detector + DX Positioning
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [f"{pixel_spacing:g}", f"{pixel_spacing:g}"]
    ds.ViewPosition = view_position
    ds.PositionerType = "NONE"
    # Acquisition Context (type 2 sequence, may be empty)
    ds.AcquisitionContextSequence = Seq([])
    ds.PixelData = np.ascontiguousarray(pixels.astype("<u2")).tobytes()
    if compression != "explicit":
        ds.compress(
            _SYNTAXES[compression],
            encoding_plugin="pyjpegls" if compression == "jpegls" else "",
            generate_instance_uid=False,  # keep the deterministic UID (pydicom 3 makes a new one by default)
        )
    ds.save_as(str(path), enforce_file_format=True)
    return ds

