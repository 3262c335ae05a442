"""Reading X-ray DICOM, boxes and datalists; ingest of PACS exports.

Importing this package (and its modules but :mod:`~cutremain_monai.io.loader`) loads neither torch nor MONAI, so
ingest workers and the importers start fast. The MONAI-facing names, ``XrayDicomReader`` and ``register_reader``,
live in :mod:`cutremain_monai.io.loader`; asking this package for them imports that module (which also registers
the reader with MONAI by its short name, ``LoadImage(reader="XrayDicomReader")``).
"""

from cutremain_monai.io.boxes import as_boxes, validate_boxes, xywh_to_xyxy
from cutremain_monai.io.datalist import datalist_hash, kfold_by_group, load_datalist, save_datalist, split_by_group
from cutremain_monai.io.dicom import DicomReadError, read_xray_dicom

_MONAI_FACING = ("XrayDicomReader", "register_reader")


def __getattr__(name: str):
    """``cutremain_monai.io.XrayDicomReader`` / ``register_reader`` (PEP 562), from :mod:`cutremain_monai.io.loader`."""
    if name in _MONAI_FACING:
        from cutremain_monai.io import loader  # lazy: torch and MONAI load only when the MONAI reader is asked for

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DicomReadError",
    "XrayDicomReader",
    "read_xray_dicom",
    "register_reader",
    "as_boxes",
    "validate_boxes",
    "xywh_to_xyxy",
    "load_datalist",
    "save_datalist",
    "split_by_group",
    "kfold_by_group",
    "datalist_hash",
]
