"""Reading X-ray DICOM, boxes and datalists; ingest of PACS exports."""

from cutremain_monai.io.boxes import as_boxes, validate_boxes, xywh_to_xyxy
from cutremain_monai.io.datalist import datalist_hash, kfold_by_group, load_datalist, save_datalist, split_by_group
from cutremain_monai.io.dicom import DicomReadError, XrayDicomReader, read_xray_dicom


def register_reader() -> None:
    """Let ``LoadImage(reader="XrayDicomReader")`` find our reader by its short name, as MONAI's own readers."""
    from monai.transforms.io import array as io_array

    io_array.SUPPORTED_READERS.setdefault("xraydicomreader", XrayDicomReader)


register_reader()

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
