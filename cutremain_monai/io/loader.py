"""The MONAI face of our readers: ``XrayDicomReader`` and ``SimpleITKReader`` (MONAI ``ImageReader`` s),
``load_xray`` (a ``MetaTensor``) and the dictionary loader ``LoadXrayd``.

The decoding itself (DICOM display pipeline, PNG / JPEG, NIfTI / MHA / NRRD, one frame, one intensity rule) is
:mod:`cutremain_monai.io.decode`, which imports neither torch nor MONAI; this module wraps its arrays for training.
Importing it registers ``XrayDicomReader`` with MONAI by its short name, so ``LoadImage(reader="XrayDicomReader")``
finds it as it finds MONAI's own readers. The decode functions are importable from here too.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor
from monai.transforms import MapTransform
from monai.utils import ensure_tuple

from cutremain_monai.io.decode import (  # the decode names are re-exported: callers import them from here too
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    RASTER_SUFFIXES,
    decode_image,
    decode_xray,
    image_suffix,
    is_dicom_path,
    is_volume_path,
    itk_array,
    save_png16,
    split_readable,
)
from cutremain_monai.io.dicom import WINDOW_AUTO, read_xray_dicom
from cutremain_monai.io.paths import PathLike

__all__ = [
    "XrayDicomReader",
    "SimpleITKReader",
    "register_reader",
    "load_xray",
    "LoadXrayd",
    "LoadXrayD",
    "LoadXrayDict",
    "save_png16",
    "is_dicom_path",
    "is_volume_path",
    "decode_image",
    "split_readable",
    "RASTER_SUFFIXES",
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
]


class XrayDicomReader(ImageReader):
    """MONAI ``ImageReader`` for single-frame X-ray DICOM: ``LoadImaged(keys="image", reader=XrayDicomReader())``.

    Pixels go through :func:`~cutremain_monai.io.dicom.read_xray_dicom` (modality LUT, VOI LUT / window,
    MONOCHROME1 inversion, [0, 1]), the array is ``(1, H, W)`` with rows as displayed: unlike MONAI's
    ``PydicomReader`` it does not transpose. Bundles can name it as ``cutremain_monai.io.XrayDicomReader`` or, once
    this module is imported (as ``cutremain_monai.io.XrayDicomReader`` does), as ``"XrayDicomReader"``.
    """

    def __init__(self, window: str | int | tuple[float, float] = WINDOW_AUTO, raw: bool = False):
        super().__init__()
        self.window = window
        self.raw = raw

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        for name in ensure_tuple(filename):
            suffix = os.path.splitext(str(name))[1].lower()
            if suffix not in (".dcm", ".dicom", ".dic", ""):
                return False
        return True

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs) -> list[tuple[np.ndarray, dict]]:
        window = kwargs.get("window", self.window)
        raw = kwargs.get("raw", self.raw)
        return [read_xray_dicom(p, window=window, raw=raw) for p in ensure_tuple(data)]

    def get_data(self, img: list[tuple[np.ndarray, dict]]) -> tuple[np.ndarray, dict[str, Any]]:
        if len(img) == 1:
            return img[0]
        arrays = [a for a, _ in img]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack DICOM images of different shapes {sorted(shapes)}")
        meta = dict(img[0][1])
        return np.concatenate(arrays, axis=0), meta


def register_reader() -> None:
    """Let ``LoadImage(reader="XrayDicomReader")`` find our reader by its short name, as MONAI's own readers."""
    from monai.transforms.io import array as io_array

    io_array.SUPPORTED_READERS.setdefault("xraydicomreader", XrayDicomReader)


register_reader()


class SimpleITKReader(ImageReader):
    """MONAI ``ImageReader`` for the files SimpleITK reads (here: MetaImage ``.mha``/``.mhd``, NRRD).

    Like MONAI's ``ITKReader`` (which needs the ``itk`` package), ``get_data`` returns the array with ITK's axis
    order ``(x, y[, z])`` (components, if any, last) unless ``reverse_indexing=True``, which gives numpy's
    ``([z,] y, x)`` (:func:`~cutremain_monai.io.decode.itk_array`).
    """

    def __init__(self, reverse_indexing: bool = False, suffixes: Sequence[str] = ITK_SUFFIXES):
        super().__init__()
        self.reverse_indexing = reverse_indexing
        self.suffixes = tuple(s.lower() for s in suffixes)

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(image_suffix(str(f)) in self.suffixes for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs):
        import SimpleITK as sitk

        return [sitk.ReadImage(os.fspath(p)) for p in ensure_tuple(data)]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        out = [itk_array(i, self.reverse_indexing) for i in ensure_tuple(img)]
        if len(out) == 1:
            return out[0]
        shapes = {a.shape for a, _ in out}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack images of different shapes {sorted(shapes)}")
        meta = dict(out[0][1])
        meta["original_channel_dim"] = 0
        return np.stack([a for a, _ in out]), meta


def load_xray(path: str, reader: XrayDicomReader | None = None) -> MetaTensor:
    """``(1, H, W)`` float32 MetaTensor in [0, 1] with ``filename_or_obj`` in its metadata
    (:func:`~cutremain_monai.io.decode.decode_xray`; ``reader`` gives the DICOM window and ``raw``)."""
    arr, meta = decode_xray(path, window=reader.window if reader else WINDOW_AUTO, raw=reader.raw if reader else False)
    affine = meta.pop("affine", None)
    meta.pop("original_affine", None)
    return MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(affine) if affine is not None else None, meta=meta)


class LoadXrayd(MapTransform):
    """Dictionary loader: replaces each path under ``keys`` by its ``(1, H, W)`` image (see
    :mod:`cutremain_monai.io.decode`).

    Errors name the file (``DicomReadError`` for DICOM; ``OSError`` from PIL or the NIfTI / ITK readers is
    re-raised with the path; ``ValueError`` for a 3-D volume or a multi-component image).
    """

    def __init__(self, keys: KeysCollection = "image", window="auto", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.reader = XrayDicomReader(window=window)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if not isinstance(value, (str, os.PathLike)):
                continue  # already loaded
            try:
                d[key] = load_xray(os.fspath(value), self.reader)
            except OSError as e:
                if os.fspath(value) in str(e):
                    raise
                raise OSError(f"{value}: cannot read image ({e})") from e
        return d


LoadXrayD = LoadXrayDict = LoadXrayd
