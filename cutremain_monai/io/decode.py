"""Decoding any image file we read to a ``(1, H, W)`` float32 array in [0, 1], in one frame; numpy only.

Neither torch nor MONAI is imported here (nor by :mod:`cutremain_monai.io.dicom`), so ingest workers, importers and
the set-aside screen start in a fraction of a second; :mod:`cutremain_monai.io.loader` wraps these arrays in MONAI
``MetaTensor`` s for training (``load_xray``, ``LoadXrayd``).

* DICOM goes through :func:`~cutremain_monai.io.dicom.read_xray_dicom` (display pipeline, [0, 1]).
* PNG / JPEG / BMP / TIFF are read with PIL, converted to grey and scaled to [0, 1] by their bit depth (MONAI's
  ``PILReader`` would transpose them).
* NIfTI (``.nii``, ``.nii.gz``) through nibabel, with the voxel size MONAI's ``NibabelReader`` reports; MetaImage /
  NRRD (``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``) through SimpleITK (MONAI's own ``ITKReader`` needs the ``itk``
  package, which this project does not install). These are what segmentation tools export lung masks as.

Every route gives a ``(1, H, W)`` float32 array, row 0 at the top, x = column, so boxes and masks in stored-image
pixels mean the same thing for every format.

**Voxel order of NIfTI / MHA / NRRD.** In these files the first voxel axis ``i`` (the fastest on disk, ITK's
``x``) runs along a row, i.e. it is the column; ``j`` (``y``) is the row. MONAI's readers return ``[i, j]``
(``x`` first, "reversed indexing" relative to numpy), so the loader swaps the two axes: a mask ``a[row, col]``
written with ``SimpleITK.WriteImage(SimpleITK.GetImageFromArray(a), ...)`` reads back equal to ``a``, and a
nibabel user who writes ``nibabel.Nifti1Image(a.T, affine)`` (nibabel arrays are ``[i, j]``) gets ``a`` back too.
The direction cosines / affine are not applied (as for PNG: the stored pixel grid is the image). A volume with one
slice (``x, y, 1``) is a 2-D image; a volume with more slices, or more than one component per pixel, raises a
``ValueError`` naming the file.

**Intensity of NIfTI / MHA / NRRD** (chosen so that a mask gives the same binary lung mask as its PNG, see
:class:`~cutremain_monai.transforms.severity_preprocess.LungMask`, which thresholds a mask in [0, 1] at 0.75):

* values already in [0, 1] (``{0, 1}`` label masks, booleans, float probability maps or images) are kept;
* other non-negative whole numbers (``{0, 255}`` masks, 8-/12-/16-bit images, whatever the array dtype) are
  divided by 255 when they fit in 8 bits, else by 65535 when they fit in 16 bits (as a PNG is divided by its
  bit depth; so the V7 masks' markup value 127 stays about 0.5, not lung), else by their maximum;
* anything else (negative or fractional values beyond 1) is min-max scaled to [0, 1].

So ``{0, 1}``, ``{0, 255}`` and ``{0, 255}``-PNG masks of the same lung give the same lung mask. A multi-label map
(say 1 = right lung, 2 = left lung) is NOT a lung mask under this rule (2/255 is below any threshold): merge its
labels first.

Metadata: ``filename_or_obj``; for NIfTI / MHA / NRRD also ``pixel_spacing`` (row, column, as for DICOM),
``pixel_spacing_source``, ``spatial_shape`` and an affine with the spacing. Nothing else from the file header is
kept (NIfTI ``descrip`` / ``db_name`` and MetaImage / NRRD key-value fields can hold anything, patient names
included).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cutremain_monai.io.dicom import WINDOW_AUTO, read_xray_dicom

__all__ = [
    "RASTER_SUFFIXES",
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "image_suffix",
    "is_dicom_path",
    "is_volume_path",
    "itk_array",
    "decode_xray",
    "decode_image",
    "split_readable",
    "save_png16",
]

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")


def image_suffix(path: str) -> str:
    """The lower-case suffix that decides the reader (``.nii.gz`` as one suffix)."""
    name = os.path.basename(os.fspath(path)).lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return os.path.splitext(name)[1]


def is_volume_path(path: str) -> bool:
    """NIfTI / MetaImage / NRRD by suffix (``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``)."""
    return image_suffix(path) in NIFTI_SUFFIXES + ITK_SUFFIXES


def is_dicom_path(path: str) -> bool:
    """DICOM by suffix (.dcm/.dicom/.dic or none, as PACS exports name files), else by the DICM magic.

    Raster (PNG/JPEG/...) and NIfTI / MHA / NRRD suffixes are never DICOM.
    """
    suffix = image_suffix(path)
    if suffix in RASTER_SUFFIXES or suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
        return False
    if suffix in (".dcm", ".dicom", ".dic", ""):
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def itk_array(im, reverse_indexing: bool = False) -> tuple[np.ndarray, dict]:
    """A SimpleITK image as MONAI's ``ITKReader.get_data`` gives it: the array in ITK's axis order ``(x, y[, z])``
    (components, if any, last) unless ``reverse_indexing=True`` (numpy's ``([z,] y, x)``), and ``spacing``,
    ``origin``, ``direction`` (ITK, LPS), ``affine``, ``original_affine``, ``spatial_shape`` and
    ``original_channel_dim``; never the file's key-value fields."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(im)  # numpy order: ([z,] y, x[, c])
    ndim = im.GetDimension()
    ncomp = im.GetNumberOfComponentsPerPixel()
    if not reverse_indexing:
        axes = list(range(ndim))[::-1] + ([ndim] if ncomp > 1 else [])
        arr = arr.transpose(axes)
    spacing = np.asarray(im.GetSpacing(), dtype=np.float64)
    origin = np.asarray(im.GetOrigin(), dtype=np.float64)
    direction = np.asarray(im.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = direction @ np.diag(spacing)
    affine[:ndim, ndim] = origin
    size = np.asarray(im.GetSize())
    meta = {
        "spacing": spacing,
        "origin": origin,
        "direction": direction,
        "affine": affine,
        "original_affine": affine.copy(),
        "spatial_shape": size if not reverse_indexing else size[::-1].copy(),
        "original_channel_dim": -1 if ncomp > 1 else float("nan"),
        "space": "LPS",
    }
    return arr, meta


def _to_unit(a: np.ndarray, path: str) -> np.ndarray:
    """Stored values to [0, 1] by the rule in the module doc (dtype-independent)."""
    if a.dtype == bool:
        return a.astype(np.float32)
    if a.size == 0:
        raise ValueError(f"{path}: empty image")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{path}: image holds NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        return a.astype(np.float32)
    if lo >= 0.0 and np.array_equal(a, np.floor(a)):
        top = 255.0 if hi <= 255 else 65535.0 if hi <= 65535 else hi
        return (a / top).astype(np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)  # hi > lo here: equal values lie in [0, 1] or are whole


def _nifti_xy_spacing(img) -> np.ndarray:
    """(x, y) voxel size as MONAI's ``NibabelReader`` reports it: the header's pixdim, unless it disagrees with the
    affine and with both the sform and the qform, then the affine's column norms (MONAI's
    ``correct_nifti_header_if_necessary``, which rewrites the header so)."""
    header = img.header
    d = int(header["dim"][0])
    zooms = np.asarray(header.get_zooms(), dtype=np.float64)[:d]
    if d >= 5:
        return np.asarray(header["pixdim"][1:3], dtype=np.float64)

    def norm(affine) -> np.ndarray:
        return np.sqrt(np.square(np.asarray(affine, dtype=np.float64)[:d, :d]).sum(axis=0))

    if not np.allclose(zooms, norm(img.affine)):
        agrees = np.allclose(norm(img.get_sform()), zooms) or np.allclose(norm(img.get_qform()), zooms)
        if not (agrees and (header["sform_code"] != 0 or header["qform_code"] != 0)):
            return norm(img.affine)[:2]
    return np.asarray(header["pixdim"][1:3], dtype=np.float64)


def _read_volume(path: str) -> tuple[np.ndarray, dict]:
    """NIfTI / MHA / NRRD -> ``(1, H, W)`` float32 in [0, 1] and the kept metadata (see module doc)."""
    try:
        if image_suffix(path) in NIFTI_SUFFIXES:
            import nibabel as nib

            img = nib.load(path)
            arr = np.asanyarray(img.dataobj)
            xy_spacing, source = _nifti_xy_spacing(img), "NIfTI pixdim"
            spatial_rank = max(min(int(img.header["dim"][0]), 3), 1)  # as MONAI's reader: a 4th axis is a channel
            multi = bool(arr.dtype.fields) or (arr.ndim != spatial_rank and arr.shape[-1] > 1)
        else:
            import SimpleITK as sitk

            img = sitk.ReadImage(os.fspath(path))
            arr, header = itk_array(img)
            xy_spacing, source = np.asarray(header["spacing"][:2], dtype=np.float64), "ITK spacing"
            multi = img.GetNumberOfComponentsPerPixel() > 1
    except Exception as e:  # reader libraries raise anything (RuntimeError, ImageFileError, EOFError, ...)
        raise OSError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    arr = np.asarray(arr)
    if multi:
        raise ValueError(f"{path}: {arr.shape[-1] if not arr.dtype.fields else len(arr.dtype.fields)} components "
                         "per pixel; a radiograph or mask must have one grey channel")
    shape = arr.shape
    if arr.ndim < 2:
        raise ValueError(f"{path}: a {arr.ndim}-D image; expected a 2-D radiograph or mask")
    extra = tuple(range(2, arr.ndim))
    if any(shape[k] != 1 for k in extra):
        dims = " x ".join(str(s) for s in shape)
        raise ValueError(f"{path}: a {arr.ndim}-D volume of size {dims} (x, y, z...): only 2-D images are "
                         "read (a volume with one slice is accepted)")
    a = arr.reshape(shape[:2]).T  # (x, y) -> (row, column)
    out = _to_unit(a, path)[None]
    spacing = None
    if np.all(np.isfinite(xy_spacing)) and np.all(xy_spacing > 0):
        spacing = [float(xy_spacing[1]), float(xy_spacing[0])]  # (row, column), as pixel_spacing of DICOM
    affine = np.eye(4)
    if spacing is not None:
        affine[0, 0], affine[1, 1] = spacing
    meta = {
        "pixel_spacing": spacing,
        "pixel_spacing_source": source if spacing is not None else None,
        "spatial_shape": np.asarray(a.shape),
        "original_channel_dim": 0,
        "affine": affine,
    }
    return out, meta


def decode_xray(path: str, window: str | int | tuple[float, float] = WINDOW_AUTO, raw: bool = False
                ) -> tuple[np.ndarray, dict]:
    """``(1, H, W)`` float32 C-contiguous array in [0, 1] and its metadata with ``filename_or_obj`` (see module doc;
    ``window`` and ``raw`` apply to DICOM as in :func:`~cutremain_monai.io.dicom.read_xray_dicom`)."""
    path = os.fspath(path)
    if is_volume_path(path):
        arr, meta = _read_volume(path)
    elif is_dicom_path(path):
        arr, meta = read_xray_dicom(path, window=window, raw=raw)
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
    return np.ascontiguousarray(arr, dtype=np.float32), meta


def decode_image(path: str) -> tuple[int, int]:
    """Decode ``path`` completely, through :func:`decode_xray` as training will; return its ``(H, W)``.

    Raises whatever the decoder raises. PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is switched off meanwhile, so a
    truncated JPEG / PNG fails here even when some library has switched it on (PIL's header check alone, or that
    switch, would let it through with grey rows at the bottom).
    """
    from PIL import ImageFile

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img, _ = decode_xray(os.fspath(path))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return int(img.shape[-2]), int(img.shape[-1])


def split_readable(
    items: list[dict], key: str | Sequence[str] = "image", sizes: dict | None = None
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Decode every item's image once: ``(readable items, [(path, reason), ...])``.

    Lets a run set a damaged file aside with its reason (e.g. FracAtlas' truncated IMG0004098.jpg) instead of
    dying in the middle of an epoch. ``key`` may name several keys (e.g. ``("image", "lung_mask")``): the first
    is required, the others are checked where an item has them, and the reason then says which key of which
    image failed. ``sizes``, when given, is filled with ``path -> (H, W)`` of every file decoded.
    """
    keys = [key] if isinstance(key, str) else list(key)
    ok, bad = [], []
    for it in items:
        failed = None
        for n, k in enumerate(keys):
            path = it[k] if n == 0 else it.get(k)
            if n > 0 and not path:
                continue
            path = os.fspath(path)
            try:
                size = decode_image(path)
            except Exception as e:  # any decoder error sets this one item aside
                reason = f"{type(e).__name__}: {e}"
                failed = (path, reason if n == 0 else f"{k} of {os.fspath(it[keys[0]])}: {reason}")
                break
            if sizes is not None:
                sizes[path] = size
        if failed is None:
            ok.append(it)
        else:
            bad.append(failed)
    return ok, bad


def save_png16(path: str, image) -> str:
    """Write an image in [0, 1] (``(H, W)`` or ``(1, H, W)``; a numpy array or a torch tensor) as a 16-bit PNG that
    :func:`decode_xray` reads back to the same intensities (to 1 / 65535), atomically (a temporary file, then a
    rename); returns ``path``."""
    from PIL import Image

    if hasattr(image, "detach"):  # a torch tensor (this module does not import torch to check its type)
        image = image.detach().cpu().numpy()
    a = np.asarray(image, dtype=np.float64).squeeze()
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(np.clip(np.rint(a * 65535.0), 0, 65535).astype(np.uint16)).save(tmp)
    os.replace(tmp, path)
    return path
