"""``LoadXrayd``: one loader for DICOM and ordinary image files (PNG/JPEG/...), in one image frame.

DICOM goes through :class:`~cutremain_monai.io.dicom.XrayDicomReader` (display pipeline, [0, 1]); other files
through MONAI's ``PILReader`` without its transpose (``reverse_indexing=False``), converted to grey and scaled to
[0, 1] by their bit depth. Both give a ``(1, H, W)`` float32 MetaTensor, row 0 at the top, so boxes in
stored-image pixels mean the same thing for every format.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from cutremain_monai.io.dicom import XrayDicomReader

__all__ = ["load_xray", "LoadXrayd", "LoadXrayD", "LoadXrayDict", "is_dicom_path"]

_RASTER = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_dicom_path(path: str) -> bool:
    """DICOM by suffix (.dcm/.dicom/.dic or none, as PACS exports name files), else by the DICM magic."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _RASTER:
        return False
    if suffix in (".dcm", ".dicom", ".dic", ""):
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def load_xray(path: str, reader: XrayDicomReader | None = None) -> MetaTensor:
    """``(1, H, W)`` float32 MetaTensor in [0, 1] with ``filename_or_obj`` in its metadata."""
    path = os.fspath(path)
    if is_dicom_path(path):
        reader = reader or XrayDicomReader()
        arr, meta = reader.get_data(reader.read(path))
    else:
        from PIL import Image

        with Image.open(path) as im:
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float32)
                top = 65535.0 if mode.startswith("I;16") else max(float(a.max()), 1.0)
            else:
                a = np.asarray(im.convert("L"), dtype=np.float32)
                top = 255.0
        arr = (a / top)[None]
        meta = {"spatial_shape": np.asarray(a.shape), "original_channel_dim": 0}
    meta = dict(meta)
    meta["filename_or_obj"] = path
    affine = meta.pop("affine", None)
    meta.pop("original_affine", None)
    t = torch.as_tensor(np.ascontiguousarray(arr, dtype=np.float32))
    return MetaTensor(t, affine=torch.as_tensor(affine) if affine is not None else None, meta=meta)


class LoadXrayd(MapTransform):
    """Dictionary loader: replaces each path under ``keys`` by its ``(1, H, W)`` image (see module doc).

    Errors name the file (``DicomReadError`` for DICOM; ``OSError`` from PIL is re-raised with the path).
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
                raise OSError(f"{value}: cannot read image ({e})") from e
        return d


LoadXrayD = LoadXrayDict = LoadXrayd


def split_readable(items: list[dict], key: str = "image") -> tuple[list[dict], list[tuple[str, str]]]:
    """Decode every item's image once: ``(readable items, [(path, reason), ...])``.

    Lets a training run set a damaged file aside with its reason (e.g. FracAtlas' truncated IMG0004098.jpg)
    instead of dying in the middle of an epoch.
    """
    from PIL import Image

    ok, bad = [], []
    for it in items:
        path = it[key]
        try:
            if is_dicom_path(path):
                load_xray(path)
            else:
                with Image.open(path) as im:
                    im.load()  # header checks are not enough: truncated JPEGs fail only here
            ok.append(it)
        except Exception as e:  # any decoder error sets this one file aside
            bad.append((path, f"{type(e).__name__}: {e}"))
    return ok, bad
