"""Fuzzing the DICOM front end: mutated copies of the sample files (byte flips, truncations, insertions, broken
lengths and VRs) through read_xray_dicom, the GSPS reader and the SR box reader (seeded with SRs we write). Every input must end in success or in our
DicomReadError (naming the file and the reason): never another exception, a Rust panic or a hang (5 s per input).
The count comes from CUTREMAIN_FUZZ_INPUTS (default 20,000, about 3 minutes on 2 cores); seeds are the committed
dicom_samples (and the real CR files of ../shared/data when present). Crashes it found are the regression tests
below."""

import copy
import glob
import logging
import os
import signal
import warnings

import numpy as np
import pytest

from cutremain_monai.io.dicom import DicomReadError, read_dataset, read_xray_dicom
from cutremain_monai.io.gsps import read_gsps_file
from tests.conftest import SAMPLES, SHARED_DATA

N_INPUTS = int(os.environ.get("CUTREMAIN_FUZZ_INPUTS", 5000))  # the 10^6-input run: README


class _Hang(BaseException):
    pass


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    kind = int(rng.integers(5))
    if kind == 0:  # random bytes
        for _ in range(int(rng.integers(1, 20))):
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
    elif kind == 1:  # truncation
        b = b[: int(rng.integers(1, len(b)))]
    elif kind == 2:  # insertion (shifts every later element)
        i = int(rng.integers(len(b)))
        b[i:i] = bytes(rng.integers(0, 256, int(rng.integers(1, 64))).astype(np.uint8))
    elif kind == 3:  # a length field: undefined or random (in the header, where element lengths sit)
        i = int(rng.integers(128, max(129, min(len(b) - 4, 4000))))
        b[i : i + 4] = b"\xff\xff\xff\xff" if rng.random() < 0.5 else bytes(rng.integers(0, 256, 4).astype(np.uint8))
    else:  # a VR or tag
        i = int(rng.integers(132, max(133, min(len(b) - 2, 3000))))
        b[i : i + 2] = bytes(rng.integers(0, 256, 2).astype(np.uint8))
    return bytes(b)


def _seeds() -> list[str]:
    seeds = sorted(glob.glob(os.path.join(SAMPLES, "*", "*.dcm")))
    seeds += sorted(glob.glob(os.path.join(SHARED_DATA, "dicom", "siim-acr-cr", "*.dcm")))[:3]
    return seeds


def _sr_seeds(folder) -> list[str]:
    """Two of our own SRs (a localised finding and a plain one), written from the samples, as seeds for the SR
    box reader."""
    import pydicom

    from cutremain_monai.io.sr import Finding, ModelDevice, write_findings_sr

    out = []
    for i, name in enumerate(("clavicle_000.dcm", "clavicle_001.dcm")):
        ds = pydicom.dcmread(os.path.join(SAMPLES, "clavicle", name))
        path = os.path.join(folder, f"seed_{i}_sr.dcm")
        write_findings_sr(ds, [Finding("fracture", 0.7, [3, 4, 30, 40] if i == 0 else None)],
                          ModelDevice("clavicle_fracture", "0.1", "m"), path)
        out.append(path)
    return out


def _read(path: str, seed: str) -> None:
    if seed.endswith("_gsps.dcm"):
        read_gsps_file(path, dataset=read_dataset(path))
    elif seed.endswith("_sr.dcm"):
        from cutremain_monai.io.sr import read_sr_file

        read_sr_file(path)
    else:
        read_xray_dicom(path)


def test_fuzz_dicom_readers(tmp_path):
    seeds = _seeds() + _sr_seeds(str(tmp_path)) * 10  # (the SR reader gets about a tenth of the inputs)
    data = [open(p, "rb").read() for p in seeds]
    rng = np.random.default_rng(2026)
    path = str(tmp_path / "input.dcm")

    hung = []

    def alarm(*_):  # recorded first: a reader that turns the interruption into DicomReadError still fails the test
        hung.append(True)
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    failures, ok, rejected = [], 0, 0
    pydicom_logger = logging.getLogger("pydicom")
    level = pydicom_logger.level
    pydicom_logger.setLevel(logging.CRITICAL)  # mutated files make pydicom warn about every bad value
    quiet = warnings.catch_warnings()
    quiet.__enter__()
    warnings.simplefilter("ignore")
    try:
        for _ in range(N_INPUTS):
            j = int(rng.integers(len(data)))
            mutated = _mutate(data[j], rng)
            with open(path, "wb") as f:
                f.write(mutated)
            signal.setitimer(signal.ITIMER_REAL, 5.0)
            try:
                hung.clear()
                _read(path, seeds[j])
                ok += 1
            except DicomReadError as e:
                assert e.path == path and e.reason  # names the file and says why
                rejected += 1
                if "MemoryError" in e.reason or "Out of memory" in e.reason:  # an allocation bomb, caught only
                    # because the run has a memory limit (ulimit -v): without one the kernel kills the process
                    failures.append((os.path.basename(seeds[j]), "allocation", e.reason[:200]))
            except BaseException as e:  # noqa: BLE001 - anything else is a finding (Rust panics are BaseException)
                if isinstance(e, KeyboardInterrupt):
                    raise
                failures.append((os.path.basename(seeds[j]), type(e).__name__, str(e)[:200]))
                if len(failures) >= 10:
                    break
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                if hung:
                    failures.append((os.path.basename(seeds[j]), "hang", "more than 5 s"))
    finally:
        signal.signal(signal.SIGALRM, previous)
        quiet.__exit__(None, None, None)
        pydicom_logger.setLevel(level)
    assert not failures, failures
    assert ok + rejected == N_INPUTS and ok > 0 and rejected > 0


def test_corrupt_rle_segment_is_a_read_error_not_a_panic(tmp_path):
    """Found by fuzzing: a corrupt RLE run made pylibjpeg-rle's Rust decoder panic (pyo3 PanicException, a
    BaseException that ``except Exception`` lets through), which would end a whole ingest."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(os.path.join(SAMPLES, "chest", "chest_001.dcm"))
    assert ds.file_meta.TransferSyntaxUID.name == "RLE Lossless"
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[11761] = 208  # the byte the fuzzer's search found
    bad = copy.copy(ds)
    bad.PixelData = encapsulate([bytes(frame)])
    path = str(tmp_path / "rle.dcm")
    bad.save_as(path)
    with pytest.raises(DicomReadError, match="pixel data could not be decoded"):
        read_xray_dicom(path)


@pytest.mark.parametrize("case", ["odd_ul_length", "unknown_vr"])
def test_malformed_elements_are_read_errors(tmp_path, case):
    """Found by fuzzing: pydicom's BytesLengthException while parsing (an UL element whose length is not a multiple
    of 4) and NotImplementedError for an unknown VR met when a deferred element is first read escaped as their own
    types instead of DicomReadError."""
    src = open(os.path.join(SAMPLES, "clavicle", "clavicle_000.dcm"), "rb").read()
    if case == "odd_ul_length":
        i = src.index(b"\x02\x00\x00\x00UL")  # (0002,0000) File Meta Information Group Length, UL
        data, reason = src[: i + 6] + b"\x03\x00" + src[i + 8 :], "unreadable or truncated DICOM (BytesLengthException"
    else:
        i = src.index(b"\x28\x00\x11\x00")  # (0028,0011) Columns: its explicit VR replaced
        data, reason = src[: i + 4] + b"U\xf4" + src[i + 6 :], "NotImplementedError"
    path = str(tmp_path / "bad.dcm")
    open(path, "wb").write(data)
    with pytest.raises(DicomReadError) as err:
        read_xray_dicom(path)
    assert err.value.path == path and reason in err.value.reason, err.value.reason


def _mutate_json(text: str, rng: np.random.Generator) -> bytes:
    """Structural mutations (a value replaced by one of another type, a key dropped) or byte-level ones."""
    import json

    if rng.random() < 0.4:
        return _mutate(text.encode(), rng) if len(text) > 300 else text.encode()[: int(rng.integers(len(text)))]
    data = json.loads(text)
    odd = [None, 0, -1, 1e308, "x", "", [], {}, [[1, 2, 3]], [["a", 1, 2, 3]], [1, 2, 3, 4], {"image": 3},
           "\x00", [[float("nan")] * 4], [[1e400, 0, 1, 1]], True, [[[1, 2, 3, 4]]], "../../etc/passwd"]

    def walk(node, depth=0):
        if isinstance(node, dict) and node:
            k = list(node)[int(rng.integers(len(node)))]
            r = rng.random()
            if r < 0.2:
                del node[k]
            elif r < 0.6 or depth > 4:
                node[k] = copy.deepcopy(odd[int(rng.integers(len(odd)))])
            else:
                walk(node[k], depth + 1)
        elif isinstance(node, list) and node:
            i = int(rng.integers(len(node)))
            if rng.random() < 0.5:
                node[i] = copy.deepcopy(odd[int(rng.integers(len(odd)))])
            else:
                walk(node[i], depth + 1)

    for _ in range(int(rng.integers(1, 4))):
        walk(data)
    return json.dumps(data, allow_nan=True).encode()


def test_fuzz_datalist_loader(tmp_path):
    """Mutated datalists (a plain one, a multi-task one, an ingest-made one with ``root``) through load_datalist:
    success or our DatalistError naming the file (a missing section: DatalistSectionError), nothing else."""
    import json

    from cutremain_monai.io.datalist import DatalistError, load_datalist

    with open(os.path.join(SAMPLES, "datalist.json")) as f:
        full = json.load(f)
    small = {t: {s: v[:3] for s, v in d.items() if isinstance(v, list)} for t, d in full.items() if isinstance(d, dict)}
    seeds = [json.dumps(small), json.dumps(small["covid"]),
             json.dumps({"root": "dl_files", "training": small["clavicle"]["training"], "validation": [],
                         "test": [], "ingest": {"path_mode": "uid"}})]
    rng = np.random.default_rng(7)
    path = str(tmp_path / "dl.json")
    failures, ok, rejected = [], 0, 0
    n = max(2000, N_INPUTS // 10)
    for _ in range(n):
        j = int(rng.integers(len(seeds)))
        open(path, "wb").write(_mutate_json(seeds[j], rng))
        task = "clavicle" if j == 0 else None
        section = ("training", "validation", "test")[int(rng.integers(3))]
        try:
            load_datalist(path, section, task=task)
            ok += 1
        except DatalistError as e:
            assert e.path == path and e.reason and str(e).startswith(path)
            rejected += 1
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            failures.append((j, type(e).__name__, str(e)[:200]))
            if len(failures) >= 10:
                break
    assert not failures, failures
    assert ok > n // 20 and rejected > n // 20 and ok + rejected == n, (ok, rejected)


@pytest.mark.parametrize("content, reason", [
    (b'{"training": [{"image": "a\xff.dcm"}]}', "not a JSON datalist (UnicodeDecodeError"),
    (b'{"training": [', "not a JSON datalist (JSONDecodeError"),
    (b'[1, 2]', "expected a JSON object of sections, got list"),
    (b'{"training": 3}', "section 'training' must be a list of items, got int"),
    (b'{"training": [{"image": "a", "boxes": [[1, 2, 3], [1, 2, 3, 4]]}]}', "training[0]: field 'boxes' is not a list"),
    (b'{"training": [{"image": "a", "box_labels": 5}]}', "training[0]: field 'box_labels' must be a list, got int"),
    (b'{"training": [{"image": "a", "zone_scores": 2}]}', "training[0]: field 'zone_scores' must hold 6 values"),
    (b'{"training": [{"image": "a", "lung_mask": {}}]}', "training[0]: field 'lung_mask' must be a path, got dict"),
    (b'{"root": 7, "training": []}', "field 'root' must be a folder path, got int"),
])
def test_malformed_datalists_are_datalist_errors(tmp_path, content, reason):
    """Found by fuzzing the datalist loader: undecodable bytes, broken JSON and fields of the wrong type escaped as
    UnicodeDecodeError / JSONDecodeError / TypeError without the file's name."""
    from cutremain_monai.io.datalist import DatalistError, load_datalist

    path = str(tmp_path / "dl.json")
    open(path, "wb").write(content)
    with pytest.raises(DatalistError) as err:
        load_datalist(path, "training")
    assert err.value.path == path and err.value.reason.startswith(reason), err.value.reason


def test_missing_section_is_also_a_key_error(tmp_path):
    from cutremain_monai.io.datalist import DatalistSectionError, load_datalist

    path = str(tmp_path / "dl.json")
    open(path, "w").write('{"training": []}')
    with pytest.raises(KeyError) as err:
        load_datalist(path, "test")
    assert isinstance(err.value, DatalistSectionError) and str(err.value) == f"{path}: no section 'test'"


@pytest.mark.parametrize("case", ["jpegls_zero_rows", "j2k_size", "huge_header"])
def test_codestream_size_is_checked_before_decoding(tmp_path, case):
    """Found by the long fuzz run: a JPEG-LS frame header declaring 0 rows (a 128x128 image) made CharLS allocate
    23 GB, and the kernel killed the process: no exception to catch. The reader now compares the codestream's
    size with the header's before decoding, and refuses headers above MAX_PIXELS."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    from cutremain_monai.io.dicom import MAX_PIXELS, codestream_size

    src = {"jpegls_zero_rows": "chest_000.dcm", "j2k_size": "chest_003.dcm", "huge_header": "chest_000.dcm"}[case]
    ds = pydicom.dcmread(os.path.join(SAMPLES, "chest", src))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    assert codestream_size(bytes(frame)) == (ds.Rows, ds.Columns)
    if case == "jpegls_zero_rows":
        i = frame.index(b"\xff\xf7")  # SOF55: length (2), precision (1), rows (2), columns (2)
        frame[i + 5 : i + 7] = b"\x00\x00"
        reason = f"compressed frame declares 0 x {ds.Columns} pixels"
    elif case == "j2k_size":
        i = frame.index(b"\xff\x51")  # SIZ: marker (2), length (2), Rsiz (2), Xsiz (4), Ysiz (4)
        frame[i + 10 : i + 14] = (60000).to_bytes(4, "big")
        reason = f"compressed frame declares 60000 x {ds.Columns} pixels"
    else:
        ds.Rows = ds.Columns = 65535
        reason = f"image of 65535 x 65535 pixels is above the limit of {MAX_PIXELS} pixels"
    ds.PixelData = encapsulate([bytes(frame)])
    path = str(tmp_path / "bad.dcm")
    ds.save_as(path)
    with pytest.raises(DicomReadError) as err:
        read_xray_dicom(path)
    assert err.value.reason.startswith(reason), err.value.reason


def test_corrupt_sop_class_of_an_sr_is_a_read_error(tmp_path):
    """Found by fuzzing the SR box reader: an unknown VR on (0008,0016) SOP Class UID raised NotImplementedError
    while checking that the file is an SR."""
    from cutremain_monai.io.sr import read_sr_file

    seed = _sr_seeds(str(tmp_path))[1]
    src = open(seed, "rb").read()
    i = src.index(b"\x08\x00\x16\x00")  # (0008,0016): its explicit VR replaced
    path = str(tmp_path / "bad_sr.dcm")
    open(path, "wb").write(src[: i + 4] + b"Un" + src[i + 6 :])
    with pytest.raises(DicomReadError) as err:
        read_sr_file(path)
    assert err.value.path == path and "NotImplementedError" in err.value.reason, err.value.reason
