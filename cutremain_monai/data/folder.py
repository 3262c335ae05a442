"""The datalist of a folder to score: every image under it, any file names, and what was left out and why.

``folder_datalist(input_dir)`` is the one place where bundle inference decides which files of a folder are
images. What it adds over the directory readers at hand:

* MONAI's ``LoadImage`` / ``PydicomReader`` / ``ITKReader``, given a folder, read it as *one* DICOM series (a
  volume); they do not list a tree of single radiographs, and a folder holding a presentation state, an SR or a
  PDF next to the images makes them fail or stack the wrong objects.
* ``pydicom.fileset.FileSet`` needs a DICOMDIR (PACS exports often have none) and lists every SOP instance
  without judging whether it is an image.
* A file-name rule (``*.dcm`` but not ``*_gsps.dcm``) is wrong for real exports, whose files have no suffix
  (``IM000123``) or UID names (``1.2.840....7``), and whose presentation states, structured reports, key object
  selections, dose reports and encapsulated PDFs look like any other ``.dcm``.

Here every file is classified from its DICOM header only (``dcmread(stop_before_pixels=True, force=False)``; no
pixel data is read or decoded): it is an image when its SOP Class is an image storage class (a positive list:
the "... Image Storage" classes of the DICOM dictionary, so presentation states, SRs, segmentations,
encapsulated documents, raw data, waveforms, DICOMDIRs and unknown private classes are all left out), it has
pixel data at the top level of the dataset and its Photometric Interpretation is MONOCHROME1 / MONOCHROME2.
Files that are not DICOM are images when their suffix is PNG / JPEG / BMP / TIFF (confirmed by PIL's header
check) or NIfTI / MetaImage / NRRD (``.nii[.gz]``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``; the ``.raw`` beside an
``.mhd`` is not an image). Everything else is listed in ``skipped`` with a reason, and optionally in a CSV
report. Decoding is left to the evaluator's dataset, which sets undecodable files aside itself.

Reasons never hold DICOM attribute values other than the SOP class name (or an unknown class's UID) and the
photometric interpretation (a defined term), so the report carries no patient name or ID; the elements used are
read raw, so pydicom's value validation never logs their values, and its warnings while reading are silenced.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings
from collections.abc import Sequence

from cutremain_monai.io.dicom import dcmread_unnamed, short_read, UnnamedFile
from cutremain_monai.io.paths import (file_token, header_identifiers, path_carries_identifiers, resolve_path_mode,
                                      valid_uid)

__all__ = ["folder_datalist", "IMAGE_SOP_CLASS_UIDS", "unscored"]

logger = logging.getLogger(__name__)

_RASTER = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_VOLUME = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")  # as cutremain_monai.io.loader reads them
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_MASK_EXTS = (".png", ".jpg", ".jpeg", ".dcm", ".nii.gz", ".nii", ".mha", ".nrrd")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# (7FE0,0010) Pixel Data, (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data, both byte orders
_PIXEL_TAG_BYTES = frozenset(
    bytes.fromhex(h) for h in ("e07f1000", "e07f0800", "e07f0900", "7fe00010", "7fe00008", "7fe00009")
)
_PHOTOMETRIC_TERMS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT",
                      "PALETTE COLOR", "HSV", "ARGB", "CMYK", "XYB")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEFLATED = "1.2.840.10008.1.2.1.99"


def _image_sop_classes() -> frozenset[str]:
    """Every SOP Class of the DICOM dictionary (as pydicom ships it) named "... Image Storage[ - ...]".

    That is CR, DX / MG / IO (for presentation and for processing), secondary capture (single and multi-frame),
    XA / RF, CT, MR, US, NM, PET, RT Image, VL, ophthalmic, breast projection / tomosynthesis, etc. (retired ones
    too). No presentation state, SR, segmentation, encapsulated document or raw data class has that name.
    """
    from pydicom._uid_dict import UID_dictionary

    return frozenset(uid for uid, (name, kind, *_) in UID_dictionary.items()
                     if kind == "SOP Class" and "Image Storage" in name)


IMAGE_SOP_CLASS_UIDS = _image_sop_classes()


def _sop_class_reason(uid: str) -> str:
    """Why a DICOM object of SOP Class ``uid`` (not an image storage class) is left out."""
    from pydicom._uid_dict import UID_dictionary

    entry = UID_dictionary.get(uid)
    name = entry[0] if entry and entry[1] == "SOP Class" else ""
    if not name:
        if not valid_uid(uid):  # never echo arbitrary text
            return "invalid SOP Class UID"
        return f"unknown SOP class {uid} (not an image storage class)"
    low = name.lower()
    if "presentation state" in low:
        kind = "presentation state"
    elif low.endswith("sr storage") or " sr storage" in low or "key object selection" in low:
        kind = "structured report"
    elif "segmentation" in low:
        kind = "segmentation"
    elif low.startswith("encapsulated"):
        kind = "encapsulated document"
    elif "raw data" in low:
        kind = "raw data"
    elif "waveform" in low:
        kind = "waveform"
    elif "media storage directory" in low:
        kind = "DICOMDIR"
    else:
        kind = "not an image"
    return f"{kind} ({name})"


def _has_top_level_pixels(fp, ds, path: str) -> bool:
    """Whether the file holds (7FE0,0010) / (7FE0,0008) / (7FE0,0009) at the top level of its dataset.

    ``dcmread(fp, stop_before_pixels=True)`` leaves ``fp`` at the start of that element when there is one (and at
    the end of the file otherwise), so the next four bytes are its tag: nothing of the pixel data is read. When
    that does not hold (deflated transfer syntax, or a future pydicom that leaves the file elsewhere) the header is
    read again with every large value deferred, and the elements are looked up in it.
    """
    tsuid = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "") or "")
    if tsuid != _DEFLATED:
        head = fp.read(4)
        if head in _PIXEL_TAG_BYTES:
            return True
        if not head:
            return False

    full = dcmread_unnamed(path, defer_size=256, force=False)
    return any(k in full for k in _PIXEL_KEYWORDS)


def _raw_text(ds, tag: int) -> str:
    """The text of element ``tag`` without converting it: pydicom's value validation on conversion logs invalid
    values (which could be a patient name in the wrong element) to its logger, beyond the reach of warning
    filters."""
    elem = ds.get_item(tag)
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("ascii", "replace").strip(" \x00")
    return str(value or "").strip(" \x00")


def _classify_dicom(path: str, header: dict | None = None) -> tuple[bool | None, str]:
    """(True, "") for a usable image, (False, reason) for a DICOM file that is not one, (None, "") for non-DICOM.
    ``header`` (a dict) receives the SOP Instance UID (``uid``) and the identifiers (``identifiers``) when read."""
    import pydicom
    from pydicom.errors import InvalidDicomError


    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings may quote attribute values (patient names)
        try:
            with UnnamedFile(path) as fp:  # no path in pydicom's messages
                try:
                    ds = pydicom.dcmread(fp, stop_before_pixels=True, force=False)
                except InvalidDicomError:
                    return None, ""
                if header is not None:
                    header["uid"] = _raw_text(ds, 0x00080018)  # SOP Instance UID
                    header["identifiers"] = header_identifiers(ds)
                sop = _raw_text(ds, 0x00080016)  # SOP Class UID
                if not sop and hasattr(ds, "file_meta"):
                    sop = _raw_text(ds.file_meta, 0x00020002)  # Media Storage SOP Class UID
                truncated = _truncation(ds)
                if truncated:
                    return False, truncated
                if not sop:
                    return False, "DICOM without SOP Class UID"
                if sop not in IMAGE_SOP_CLASS_UIDS:
                    return False, _sop_class_reason(sop)
                if not _has_top_level_pixels(fp, ds, path):
                    return False, "DICOM image without pixel data"
        except Exception as e:  # truncated / corrupt headers, unreadable files: one file never stops the folder
            return False, f"unreadable DICOM header ({type(e).__name__})"
    pi = _raw_text(ds, 0x00280004)  # Photometric Interpretation
    if not pi:
        return False, "no photometric interpretation"
    if pi not in _MONOCHROME:
        shown = pi if pi in _PHOTOMETRIC_TERMS else "(not a defined term)"  # never echo arbitrary text
        return False, f"photometric interpretation {shown} not supported"
    return True, ""


def _truncation(ds) -> str:
    """A reason when the header read ended inside the file (:func:`cutremain_monai.io.dicom.short_read`)."""
    found = short_read(ds)
    if found is None:
        return ""
    return "empty or truncated DICOM dataset" if found[0] == "empty" else "truncated DICOM file"


def _split_suffix(name: str) -> tuple[str, str]:
    """(stem, suffix) with the recognised image suffixes only (``.nii.gz`` is one); ``IM000123.1`` keeps its dot."""
    low = name.lower()
    for s in _VOLUME + _RASTER + _DICOM_SUFFIXES:
        if low.endswith(s) and len(name) > len(s):
            return name[: -len(s)], s
    return name, ""


def _raster_ok(path: str) -> str:
    """"" when PIL recognises the file's header (no decoding), else the reason."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.verify()
    except Exception as e:
        return f"not a readable {os.path.splitext(path)[1].lower().lstrip('.').upper()} image ({type(e).__name__})"
    return ""


def _find_mask(mask_dir: str, rel_stem: str, mask_suffix: str) -> str | None:
    base = os.path.join(mask_dir, *rel_stem.split("/")) + mask_suffix
    for ext in _MASK_EXTS:
        for e in (ext, ext.upper()):
            if os.path.isfile(base + e):
                return os.path.abspath(base + e)
    return None


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path != folder and os.path.commonpath([path, folder]) == folder


def _checked_folders(input_dir, mask_dir, mask_suffix: str) -> tuple[str, str | None]:
    """``input_dir`` and ``mask_dir`` as paths, after checking that they are folders and can be told apart."""
    input_dir = os.fspath(input_dir)
    for what, folder in (("input folder", input_dir), ("mask folder", mask_dir)):
        if folder is None:
            continue
        if not os.path.exists(folder):
            raise FileNotFoundError(f"{what} does not exist: {folder}")
        if not os.path.isdir(folder):
            raise NotADirectoryError(f"{what} is not a folder: {folder}")
    mask_dir = os.fspath(mask_dir) if mask_dir is not None else None
    if mask_dir is not None and not mask_suffix and os.path.realpath(mask_dir) == os.path.realpath(input_dir):
        raise ValueError(f"mask folder {mask_dir} is the input folder: give mask_suffix (e.g. '_lungs') so masks "
                         "and images can be told apart")
    return input_dir, mask_dir


CACHE_FOLDER = ".preprocessed"  # the bundles' default cache beside a datalist (cutremain_monai.data.preprocessed)


def _walk_sorted(input_dir: str) -> list[tuple[str, str]]:
    """(relative posix path, path) of every file under ``input_dir``, sorted by relative path; the bundles' own
    preprocessed-cache folders (``.preprocessed``, made when a datalist in this tree was trained on) are not part
    of an export and are left out, with a log line."""
    files = []
    for d, dirs, names in os.walk(input_dir):
        if CACHE_FOLDER in dirs:
            dirs.remove(CACHE_FOLDER)
            logger.info("left out the preprocessed cache %s (not part of the export)", os.path.join(d, CACHE_FOLDER))
        dirs.sort()
        files += [os.path.join(d, n) for n in names]
    return sorted((os.path.relpath(p, input_dir).replace(os.sep, "/"), p) for p in files)


def _dicom_reason(rel: str, path: str, suffix: str, header: dict) -> tuple[bool | None, str]:
    """:func:`_classify_dicom` of a file, with the reason for a file that is not DICOM at all (``None``)."""
    ok, reason = _classify_dicom(path, header)
    if ok is None:
        if suffix in _DICOM_SUFFIXES:
            reason = "not a DICOM file (no DICM preamble)"
        else:
            ext = os.path.splitext(rel)[1].lower()
            reason = f"not DICOM and not an image file type ({ext or 'no suffix'})"
    return ok, reason


class _Sorted:
    """The files of a folder sorted into image items and skipped rows, with what the path mode needs to know."""

    def __init__(self, mask_dir: str | None, mask_suffix: str, mask_key: str, masks_inside: bool):
        """Nothing sorted yet; the mask arguments are :func:`folder_datalist`'s."""
        self.mask_dir, self.mask_suffix, self.mask_key = mask_dir, mask_suffix, mask_key
        self.masks_inside = masks_inside
        self.mask_reason = mask_key.replace("_", " ")
        self.items: list[dict] = []
        self.skipped: list[dict] = []
        self.uids: dict[str, str] = {}  # rel -> SOP Instance UID of the DICOM images
        self.carries = False  # a DICOM file's path holds its patient's identifiers

    def add(self, rel: str, path: str) -> None:
        """Sort one file: a mask, an image (with its mask when there is one) or a file left out with the reason."""
        stem, suffix = _split_suffix(os.path.basename(rel))
        rel_stem = rel[: len(rel) - len(suffix)] if suffix else rel
        mask_dir = self.mask_dir
        if (self.mask_suffix and stem.endswith(self.mask_suffix)) or (self.masks_inside and _inside(path, mask_dir)):
            self.skipped.append({"file": rel, "reason": self.mask_reason})
            return
        if suffix in _RASTER:
            reason = _raster_ok(path)
        elif suffix in _VOLUME:
            reason = ""
        else:
            header: dict = {}
            ok, reason = _dicom_reason(rel, path, suffix, header)
            self.carries = self.carries or path_carries_identifiers(rel, header.get("identifiers"))
            if ok:
                self.uids[rel] = header.get("uid", "")
        if reason:
            self.skipped.append({"file": rel, "reason": reason})
            return
        item = {"image": os.path.abspath(path), "image_id": rel}  # (renamed in uid mode)
        if mask_dir is not None:
            mask = _find_mask(mask_dir, rel_stem, self.mask_suffix)
            if mask is not None:
                item[self.mask_key] = mask
        self.items.append(item)

    def name_by_uid(self) -> None:
        """Rename the items ``<SOP Instance UID>.dcm`` (or a keyed token of the path) and the skipped files by token."""
        names: set[str] = set()
        for it in self.items:
            uid = self.uids.get(it["image_id"], "")
            name = f"{uid}.dcm" if valid_uid(uid) and f"{uid}.dcm" not in names else file_token(it["image_id"])
            names.add(name)
            it["image_id"] = name
        for row in self.skipped:
            row["file"] = file_token(row["file"])
        logger.info("files are named by SOP Instance UID (or a keyed token of the path): their paths carry "
                    "patient identifiers" if self.carries else "files are named by SOP Instance UID (path_mode='uid')")


def _write_report(report, items: list[dict], skipped: list[dict]) -> None:
    """The skipped files as a CSV (columns ``file``, ``reason``) when ``report`` is a path, and the counts logged."""
    if report is not None:
        report = os.fspath(report)
        os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
        with open(report, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file", "reason"])
            w.writeheader()
            w.writerows(skipped)
        logger.info("%d images, %d files left out (see %s)", len(items), len(skipped), report)
    else:
        logger.info("%d images, %d files left out", len(items), len(skipped))


def folder_datalist(input_dir, mask_dir=None, mask_suffix: str = "", mask_key: str = "lung_mask",
                    report=None, path_mode: str = "auto") -> tuple[list[dict], list[dict]]:
    """The images under ``input_dir`` as a MONAI datalist, and the files left out.

    Args:
        input_dir: folder walked recursively, in sorted order of relative paths; file names can be anything.
        mask_dir: where masks are looked up: the mask of ``a/b.dcm`` (or ``a/b``, ``a/b.png``...) is the first of
            ``mask_dir/a/b<mask_suffix>.{png,jpg,jpeg,dcm,nii.gz,nii,mha,nrrd}`` that exists. Only the recognised
            image suffixes are stripped to get the stem (``IM000123.1`` stays ``IM000123.1``). ``mask_dir`` may be
            ``input_dir`` itself (masks beside images); when it is a subfolder of ``input_dir``, every file in it is
            a mask, not an image.
        mask_suffix: with a suffix, files under ``input_dir`` whose stem ends with it are masks, not images.
        mask_key: the key of the mask path in an item (absent when the image has no mask file).
        report: a CSV path: the skipped files are written there (columns ``file``, ``reason``).
        path_mode: how files are named in ``image_id`` and the report (:mod:`cutremain_monai.io.paths`):
            ``relative`` (path relative to ``input_dir``), ``uid`` (DICOM images ``<SOP Instance UID>.dcm`` as
            ``cutremain ingest`` names them, every other file by a keyed token of its path), ``auto`` (``uid`` when a DICOM file's path holds its patient's name,
            ID or birth date, else ``relative``).

    Returns:
        ``(items, skipped)``: items ``{"image": absolute path, "image_id": the name (see ``path_mode``)}``
        (plus ``mask_key`` when a mask was found); skipped ``{"file": relative path, "reason": ...}``.

    Raises:
        FileNotFoundError / NotADirectoryError: ``input_dir`` (or a given ``mask_dir``) is not a folder.
    """
    input_dir, mask_dir = _checked_folders(input_dir, mask_dir, mask_suffix)
    masks_inside = mask_dir is not None and _inside(mask_dir, input_dir)
    rels = _walk_sorted(input_dir)
    resolve_path_mode(path_mode, False)
    found = _Sorted(mask_dir, mask_suffix, mask_key, masks_inside)
    for rel, path in rels:
        found.add(rel, path)
    if resolve_path_mode(path_mode, found.carries) == "uid":
        found.name_by_uid()
    items, skipped = found.items, found.skipped
    _write_report(report, items, skipped)
    if mask_dir is not None:
        logger.info("%d of %d images have a %s file in %s", sum(mask_key in it for it in items), len(items),
                    found.mask_reason, mask_dir)
    if not items:
        logger.warning("no images found in %s (%d files left out)", input_dir, len(skipped))
    return items, skipped


def _stamp(path: str | None) -> list | None:
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns] if st else None


def unscored(items: list[dict], partial_file: str, model_file: str | Sequence[str] | None = None,
             id_key: str = "image_id", resume: bool = True) -> list[dict]:
    """The items of a folder not yet scored by an earlier, interrupted run: a resumed inference scores the rest.

    ``partial_file`` is the CSV that :class:`~cutremain_monai.handlers.ClassificationPredictions` appends rows to
    (``file`` = the item's ``id_key``). Its rows count only when they were written with the same model: the
    checkpoint's path, size and modification time are kept beside it (``<partial_file>.json``); with another model
    (or none recorded) the old rows are moved to ``<partial_file>.stale`` and everything is scored again. Rows of
    files set aside count as done too (their reason is in the row). ``resume=False``: earlier rows are moved to
    ``.stale`` and everything is scored. ``model_file`` may be a list (a checkpoint ensemble, a lung segmenter
    beside the scoring model, the validation threshold and tau files whose values the rows carry): every file of it
    must be the same (a file absent then and now counts as the same).
    """
    stamp_file = partial_file + ".json"
    many = model_file is not None and not isinstance(model_file, (str, os.PathLike))
    stamp = {"model": [_stamp(m) for m in model_file] if many else _stamp(model_file)}
    old = None
    if os.path.exists(stamp_file):
        with open(stamp_file) as f:
            old = json.load(f)
    if os.path.exists(partial_file) and (old != stamp or not resume):
        os.replace(partial_file, partial_file + ".stale")
        logger.warning("earlier predictions in %s %s: moved to .stale, scoring again", partial_file,
                       "not resumed" if old == stamp else "were made with another model")
    os.makedirs(os.path.dirname(os.path.abspath(partial_file)), exist_ok=True)
    with open(stamp_file, "w") as f:
        json.dump(stamp, f)
    if not os.path.exists(partial_file):
        return list(items)
    with open(partial_file, newline="") as f:
        done = {row.get("file") for row in csv.DictReader(f)}
    rest = [it for it in items if str(it.get(id_key)) not in done]
    logger.info("resuming: %d of %d images already scored (%s)", len(items) - len(rest), len(items), partial_file)
    return rest
