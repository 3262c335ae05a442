"""X-ray DICOM reading: one file to a displayed ``(1, H, W)`` array, with pydicom and numpy only.

What this adds to MONAI's ``PydicomReader``: the display pipeline a radiologist sees, applied in the order
DICOM PS3.3 gives (C.11.1 modality LUT, C.11.2 VOI LUT / window, then MONOCHROME1 inversion), output scaled to
[0, 1], channel-first ``(1, H, W)`` with rows as displayed (no transpose), clear errors naming the file, and no
patient identifiers in the metadata. For uncompressed little-endian data it decodes straight from the pixel
buffer and fuses rescale, window and inversion into one affine map followed by one clip, which is what makes it
an order of magnitude faster than ``LoadImage(reader="PydicomReader")`` (see ``benchmarks/bench_dicom_reader.py``).
Compressed pixel data (JPEG baseline/lossless, JPEG-LS, JPEG 2000, RLE) is decoded by pydicom's plugins.

This module imports neither torch nor MONAI, so a process that only reads DICOM (an ingest worker) starts fast;
the MONAI ``ImageReader`` built on it, ``XrayDicomReader``, is in :mod:`cutremain_monai.io.loader`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pydicom

from cutremain_monai.io.paths import PathLike

__all__ = ["DicomReadError", "element_value", "UnnamedFile", "dcmread_unnamed", "quiet_pydicom", "result_source_header",
           "drop_source_equipment", "read_dataset", "check_xray_image", "read_xray_dicom", "WINDOW_AUTO", "WINDOW_NONE"]

WINDOW_AUTO = "auto"  # first VOI LUT / window in the file, else min-max of the modality output
WINDOW_NONE = "none"  # no VOI transform: min-max of the modality output

_NATIVE_LE = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # explicit / implicit VR little endian
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


class DicomReadError(ValueError):
    """A DICOM file that cannot be used, with the file and the reason (``.path``, ``.reason``)."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def element_value(value, index: int = 0) -> float:
    """One value of a possibly multi-valued DICOM element."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[index])
    return float(value)


def _n_values(value) -> int:
    return len(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else 1


class UnnamedFile:
    """A binary file opened for pydicom without a ``name`` attribute.

    pydicom quotes ``fp.name`` (the full path) in its warnings and log lines ("... in file /export/DOE^JOHN/IM1");
    where an export's folders are named after the patient, that puts the name in every log. Errors we raise name
    the file ourselves (:class:`DicomReadError`), and callers replace the path by the name they write.
    """

    def __init__(self, path: PathLike):
        self._f = open(path, "rb")

    def read(self, *args):
        return self._f.read(*args)

    def seek(self, *args):
        return self._f.seek(*args)

    def tell(self):
        return self._f.tell()

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dcmread_unnamed(path: PathLike, **kwargs):
    """``pydicom.dcmread(path, **kwargs)`` through :class:`UnnamedFile` (no path in pydicom's messages); the file
    is read and closed (deferred values cannot be read later)."""
    with UnnamedFile(path) as fp:
        return pydicom.dcmread(fp, **kwargs)


class quiet_pydicom:
    """Silence pydicom's warnings and log lines for the duration (they quote attribute values: a malformed
    birth date appears in the log as it is)."""

    def __enter__(self):
        import logging

        self._logger = logging.getLogger("pydicom")
        self._level = self._logger.level
        self._logger.setLevel(logging.CRITICAL)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        self._logger.setLevel(self._level)


# Patient and General Study attributes of type 2 (present, may be empty) that results copy from their source
_TYPE2 = {"PatientName": "PN", "PatientID": "LO", "PatientBirthDate": "DA", "PatientSex": "CS", "StudyDate": "DA",
          "StudyTime": "TM", "ReferringPhysicianName": "PN", "StudyID": "SH", "AccessionNumber": "SH"}


def result_source_header(ds):
    """A copy of an image's header to derive results from: without its pixel data, with every type-2 patient and
    study attribute present (empty where the source lacks it) and emptied where its value is malformed (a
    ``1970-01-01`` birth date makes highdicom refuse the whole object). The source is not changed."""
    import copy

    from pydicom.valuerep import DA, TM

    from pydicom.dataset import Dataset

    pixels = {0x7FE00010, 0x7FE00008, 0x7FE00009}
    out = Dataset()
    for tag in ds.keys():  # a new dataset of the same elements (pixel data left out): the source stays whole
        if int(tag) not in pixels:
            out[tag] = ds.get_item(tag)
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    with quiet_pydicom():
        for kw, vr in _TYPE2.items():
            try:
                value = out.get(kw)
            except Exception:
                value = None
            if value is None:
                setattr(out, kw, None)
                continue
            text = str(value).strip()
            try:
                if vr == "DA" and text:
                    DA(text, validation_mode=2)
                elif vr == "TM" and text:
                    TM(text, validation_mode=2)
                elif vr == "CS" and text and text not in ("M", "F", "O"):
                    raise ValueError(kw)
            except Exception:
                setattr(out, kw, None)
    out.Rows, out.Columns = int(ds.Rows), int(ds.Columns)
    return out


def drop_source_equipment(ds) -> None:
    """Remove from a derived object what highdicom copied of its source's equipment (the "Acquisition equipment
    of the source image(s)" contributing-equipment item, institution and station): results carry the source's
    patient and study modules, nothing else of it."""
    for kw in ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName"):
        if kw in ds:
            delattr(ds, kw)
    kept = [it for it in ds.get("ContributingEquipmentSequence", [])
            if str(it.get("ContributionDescription", "")) != "Acquisition equipment of the source image(s)"]
    if "ContributingEquipmentSequence" in ds:
        if kept:
            ds.ContributingEquipmentSequence = kept
        else:
            del ds.ContributingEquipmentSequence


def read_dataset(path: PathLike):
    """``pydicom.dcmread`` with errors that name the file; rejects what no X-ray path can use."""
    try:
        ds = dcmread_unnamed(path)
    except pydicom.errors.InvalidDicomError as e:
        raise DicomReadError(path, f"not a DICOM file ({e})") from e
    except Exception as e:  # EOFError, OSError, struct.error, pydicom's BytesLengthException, ... (fuzzing found several)
        raise DicomReadError(path, f"unreadable or truncated DICOM ({type(e).__name__}: {e})") from e
    try:
        _check_truncation(ds, path)
    except DicomReadError:
        raise
    except Exception as e:
        raise DicomReadError(path, f"malformed DICOM element ({type(e).__name__}: {e})") from e
    return ds


def short_read(ds) -> tuple | None:
    """How a header read ended inside the file, which pydicom accepts without a word: ``("empty",)`` for a dataset
    with no element, ``("short", tag, bytes_read, declared_length)`` when the last element's raw value is shorter
    than its declared length, else ``None``. Reads raw elements only (no value is decoded or validated)."""
    tags = list(ds.keys())
    if not tags:
        return ("empty",)
    raw = ds.get_item(tags[-1])
    length = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    if isinstance(value, (bytes, bytearray)) and length not in (None, 0xFFFFFFFF) and len(value) < length:
        return ("short", tags[-1], len(value), length)
    return None


def _check_truncation(ds, path: PathLike) -> None:
    """Raise :class:`DicomReadError` naming the file when the read ended inside it (:func:`short_read`)."""
    found = short_read(ds)
    if found is None:
        return
    if found[0] == "empty":
        raise DicomReadError(path, "empty DICOM dataset (truncated?)")
    _, tag, got, length = found
    name = pydicom.datadict.keyword_for_tag(tag) or str(tag)
    raise DicomReadError(path, f"truncated file: {name} has {got} of {length} bytes")


def check_xray_image(ds, path: PathLike) -> None:
    """Raise :class:`DicomReadError` when ``ds`` is not a single-frame greyscale image we can decode."""
    if "PixelData" not in ds:
        raise DicomReadError(path, "no PixelData (not an image object)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomReadError(path, f"multi-frame image ({frames} frames) is not supported")
    pi = str(ds.get("PhotometricInterpretation", ""))
    if pi not in _MONOCHROME or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomReadError(path, f"unsupported photometric interpretation '{pi}' (need MONOCHROME1/2)")
    for kw in ("Rows", "Columns", "BitsAllocated"):
        if kw not in ds:
            raise DicomReadError(path, f"missing {kw}")
    tsuid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsuid is None:
        raise DicomReadError(path, "missing TransferSyntaxUID in the file meta information")
    if tsuid.is_compressed:
        try:
            decoder = pydicom.pixels.get_decoder(tsuid)
        except NotImplementedError:
            decoder = None
        if decoder is None or not decoder.is_available:
            raise DicomReadError(path, f"transfer syntax {tsuid.name} ({tsuid}) has no available decoder")


MAX_PIXELS = 2**27  # 134 M pixels: four times a full-field tomosynthesis projection; above it a file is refused
_SOF = frozenset([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7])  # F7: JPEG-LS


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) that a JPEG / JPEG-LS (SOF marker) or JPEG 2000 (SIZ marker) codestream declares, else None.

    Decoders size their buffers from the codestream, not from the DICOM header: a corrupt frame header made
    CharLS allocate 23 GB for a 64x64 image (found by fuzzing; the kernel's OOM killer ended the process), so
    the reader compares the two before decoding.
    """
    j2k = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC + SIZ (after a JP2 header, when there is one)
    if j2k >= 0:
        siz = frame[j2k + 4 : j2k + 4 + 22]
        if len(siz) < 22:
            return None
        xsiz, ysiz, xo, yo = (int.from_bytes(siz[i : i + 4], "big") for i in (4, 8, 12, 16))
        return ysiz - yo, xsiz - xo
    if frame[:2] != b"\xff\xd8":
        return None
    i, end = 2, min(len(frame), 1 << 16)
    while i + 4 <= end:
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(frame[i + 2 : i + 4], "big")
        if marker in _SOF:
            seg = frame[i + 4 : i + 9]
            return (int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big")) if len(seg) == 5 else None
        if marker == 0xDA or length < 2:  # scan data before any frame header
            return None
        i += 2 + length
    return None


def _check_frame_size(ds, path: PathLike, rows: int, cols: int) -> None:
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise DicomReadError(path, f"encapsulated pixel data unreadable ({type(e).__name__}: {e})") from e
    found = codestream_size(frame)
    if found is not None and found != (rows, cols):  # (0 rows, "given later by a DNL marker", is refused too:
        # CharLS sized its buffer from it)
        raise DicomReadError(path, f"compressed frame declares {found[0]} x {found[1]} pixels, the header "
                                   f"{rows} x {cols} (corrupt codestream)")


def _stored_pixels(ds, path: PathLike) -> np.ndarray:
    """Stored values, ``(H, W)``. Native little-endian 8/16-bit is read straight from the buffer."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows * cols > MAX_PIXELS:
        raise DicomReadError(path, f"image of {rows} x {cols} pixels is above the limit of {MAX_PIXELS} pixels "
                                   "(cutremain_monai.io.dicom.MAX_PIXELS)")
    ba, bs = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    tsuid = ds.file_meta.TransferSyntaxUID
    if tsuid in _NATIVE_LE and ba in (8, 16) and not (signed and bs < ba):
        dtype = np.dtype(f"<{'i' if signed else 'u'}{ba // 8}")
        buf = ds.PixelData
        need = rows * cols * dtype.itemsize
        if len(buf) < need:
            raise DicomReadError(path, f"truncated pixel data: {len(buf)} bytes, expected {need}")
        return np.frombuffer(buf, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if not tsuid.is_compressed:
        need = rows * cols * ((ba + 7) // 8) if ba >= 8 else (rows * cols + 7) // 8
        if len(ds.PixelData) < need:
            raise DicomReadError(path, f"truncated pixel data: {len(ds.PixelData)} bytes, expected {need}")
    else:
        _check_frame_size(ds, path, rows, cols)
    try:
        arr = ds.pixel_array
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # decoders raise many types, and the Rust ones (pylibjpeg-rle) panic with a
        # BaseException (pyo3's PanicException) on corrupt data (found by fuzzing); the caller needs file and reason
        raise DicomReadError(path, f"pixel data could not be decoded ({type(e).__name__}: {e})") from e
    if arr.shape != (rows, cols):
        raise DicomReadError(path, f"decoded pixel array has shape {arr.shape}, expected {(rows, cols)}")
    return arr


def _window_from(ds, window) -> dict | None:
    """Resolve the ``window`` option to a dict describing the VOI transform, or ``None`` for min-max."""
    if isinstance(window, str):
        if window == WINDOW_NONE:
            return None
        if window != WINDOW_AUTO:
            raise ValueError(f"window must be 'auto', 'none', an index or (center, width), got {window!r}")
        index = 0
    elif isinstance(window, (tuple, list)) and len(window) == 2:
        return {"center": float(window[0]), "width": float(window[1]), "function": "LINEAR", "source": "user"}
    elif isinstance(window, (int, np.integer)):
        index = int(window)
    else:
        raise ValueError(f"window must be 'auto', 'none', an index or (center, width), got {window!r}")
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        if index >= len(ds.VOILUTSequence):
            raise ValueError(f"window index {index} out of range: {len(ds.VOILUTSequence)} VOI LUT(s) in the file")
        return {"lut_index": index, "function": "LUT", "source": "VOILUTSequence"}
    if "WindowCenter" in ds and "WindowWidth" in ds and ds.WindowCenter is not None and ds.WindowWidth is not None:
        n = _n_values(ds.WindowCenter)
        if index >= n:
            raise ValueError(f"window index {index} out of range: {n} window(s) in the file")
        fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        return {
            "center": element_value(ds.WindowCenter, index),
            "width": element_value(ds.WindowWidth, index),
            "function": fn,
            "source": "WindowCenter/WindowWidth",
        }
    if window != WINDOW_AUTO:
        raise ValueError(f"window index {index} requested but the file has no window or VOI LUT")
    return None


def _affine_window(center: float, width: float, function: str) -> tuple[float, float]:
    """(a, b) with y = clip(a * x + b, 0, 1) for the LINEAR and LINEAR_EXACT window (PS3.3 C.11.2.1.2/3)."""
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for LINEAR_EXACT, got {width}")
        return 1.0 / width, 0.5 - center / width
    if width < 1:
        raise ValueError(f"window width must be >= 1 for LINEAR, got {width}")
    span = width - 1.0 if width > 1 else 1e-12  # width 1 is a threshold at c - 0.5
    return 1.0 / span, 0.5 - (center - 0.5) / span


def _fused(stored: np.ndarray, a: float, b: float, invert: bool) -> np.ndarray:
    """clip(a * stored + b, 0, 1), or 1 minus it, in float32: three passes, the cast fused into the first (numpy,
    one thread: as fast as torch's kernels on one thread; the reader no longer imports torch)."""
    if invert:
        a, b = -a, 1.0 - b
    out = np.multiply(stored, np.float32(a), dtype=np.float32)
    out += np.float32(b)
    return np.clip(out, 0.0, 1.0, out=out)


def read_xray_dicom(
    path: PathLike, window: str | int | tuple[float, float] = WINDOW_AUTO, raw: bool = False, dataset=None
) -> tuple[np.ndarray, dict]:
    """Read one single-frame greyscale radiograph as displayed.

    Args:
        path: the DICOM file.
        window: ``"auto"`` uses the first VOI LUT Sequence item, else the first window centre/width, else the
            min-max of the modality output; an ``int`` picks that VOI LUT / window; ``(center, width)`` gives one;
            ``"none"`` applies no VOI transform (min-max scaling of the modality output).
        raw: return the stored values (float32, no LUTs, no inversion, no scaling).
        dataset: an already read ``pydicom.Dataset`` of ``path`` (avoids reading twice).

    Returns:
        ``(image, meta)``: float32 ``(1, H, W)`` in [0, 1] (row 0 = top of the displayed image) and a metadata
        dict without patient identifiers.

    Raises:
        DicomReadError: not DICOM, truncated, no PixelData, multi-frame, non-greyscale, or no decoder.
    """
    ds = read_dataset(path) if dataset is None else dataset
    try:
        return _read_xray(ds, path, window, raw)
    except DicomReadError:
        raise
    except Exception as e:  # pydicom parses elements when first read: a corrupt one fails here (found by fuzzing)
        raise DicomReadError(path, f"malformed DICOM element ({type(e).__name__}: {e})") from e


def _read_xray(ds, path: PathLike, window, raw: bool) -> tuple[np.ndarray, dict]:
    check_xray_image(ds, path)
    stored = _stored_pixels(ds, path)
    meta = xray_metadata(ds)
    pi = meta["photometric_interpretation"]
    if raw:
        meta["window"] = {"source": "raw"}
        return stored.astype(np.float32)[None], meta

    voi = _window_from(ds, window)
    has_modality_lut = "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence) > 0
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    invert = pi == "MONOCHROME1"

    if not has_modality_lut and (voi is None or voi["function"] in ("LINEAR", "LINEAR_EXACT")):
        # Fast path: modality rescale, linear window and inversion are one affine map followed by one clip.
        if voi is None:
            lo, hi = float(stored.min()), float(stored.max())
            lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
            a = 1.0 / (hi - lo) if hi > lo else 0.0
            b = -lo * a
            meta["window"] = {"source": "min-max", "min": lo, "max": hi}
        else:
            a, b = _affine_window(voi["center"], voi["width"], voi["function"])
            meta["window"] = voi
        img = _fused(stored, a * slope, a * intercept + b, invert)
        return img[None], meta

    # General path: modality LUT sequence, VOI LUT sequence or sigmoid window (float64, then clipped).
    if has_modality_lut:
        table, first, _ = _lut_table(ds.ModalityLUTSequence[0])
        values = table[np.clip(stored.astype(np.int64) - first, 0, len(table) - 1)]
    else:
        values = stored.astype(np.float64) * slope + intercept
    if voi is None:
        lo, hi = float(values.min()), float(values.max())
        img = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        meta["window"] = {"source": "min-max", "min": lo, "max": hi}
    elif voi["function"] == "LUT":
        item = ds.VOILUTSequence[voi["lut_index"]]
        lut, first, bits = _lut_table(item)
        idx = np.clip(np.rint(values).astype(np.int64) - first, 0, len(lut) - 1)
        img = lut[idx] / float(2**bits - 1)
        meta["window"] = {"source": "VOILUTSequence", "index": voi["lut_index"], "function": "LUT"}
    elif voi["function"] == "SIGMOID":
        img = 1.0 / (1.0 + np.exp(-4.0 * (values - voi["center"]) / voi["width"]))
        meta["window"] = voi
    else:
        a, b = _affine_window(voi["center"], voi["width"], voi["function"])
        img = values * a + b
        meta["window"] = voi
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    if invert:
        img = 1.0 - img
    return img[None], meta


def _lut_table(item) -> tuple[np.ndarray, int, int]:
    """(table, first input value mapped, output bits) of a LUT item (PS3.3 C.11.2.1.1, C.11.1.1.1).

    Done here rather than with ``pydicom.pixels.apply_voi``, which (pydicom 3.0) indexes 8-bit-output LUTs with
    the input cast to 8 bits, so inputs above 255 wrap around, and fails on 12-bit LUT descriptors.
    """
    n, first, bits = (int(v) for v in item.LUTDescriptor)
    n = n or 65536
    elem = item["LUTData"]
    if isinstance(elem.value, (bytes, bytearray)):
        raw = np.frombuffer(elem.value, dtype="<u2")
        if bits <= 8 and raw.size * 2 >= n and raw.size < n:  # 8-bit entries packed two per word
            raw = np.frombuffer(elem.value, dtype=np.uint8)
        table = raw[:n].astype(np.float64)
    else:
        table = np.asarray(elem.value, dtype=np.float64).reshape(-1)[:n]
    if elem.VR == "SS" or int(item.LUTDescriptor[1]) < 0:
        first = int(np.int16(np.uint16(first & 0xFFFF)))
    return table, first, bits


def pixel_spacing(ds) -> tuple[list[float] | None, str | None]:
    """(row, column) spacing in mm and which attribute it came from (PixelSpacing wins: it is calibrated)."""
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(kw)
        if value is not None and _n_values(value) == 2 and float(value[0]) > 0 and float(value[1]) > 0:
            return [float(value[0]), float(value[1])], kw  # a zero spacing (seen in real CR files) means unknown
    return None, None


def xray_metadata(ds) -> dict:
    """The metadata handed on with an image. Deliberately holds no patient identifiers (name, ID, birth date)."""
    spacing, source = pixel_spacing(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    affine = np.eye(4)
    if spacing is not None:
        affine[0, 0], affine[1, 1] = spacing
    tsuid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return {
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "modality": str(ds.get("Modality", "")),
        "view_position": str(ds.get("ViewPosition", "")),
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")),
        "transfer_syntax_uid": str(tsuid or ""),
        "bits_stored": int(ds.get("BitsStored", ds.get("BitsAllocated", 0))),
        "rows": rows,
        "columns": cols,
        "pixel_spacing": spacing,
        "pixel_spacing_source": source,
        "spatial_shape": np.asarray([rows, cols]),
        "original_channel_dim": 0,
        "affine": affine,
        "original_affine": affine.copy(),
    }
