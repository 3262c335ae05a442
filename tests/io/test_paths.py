"""Naming files without the patient: identifiers found in paths, keyed file tokens, the link folder."""

import hashlib
import hmac
import os

import pydicom
import pytest

from cutremain_monai.io import paths as P


def _ds(name="DOE^JOHN^Q", pid="MRN0012345", birth="19800101"):
    ds = pydicom.Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, birth
    return ds


def test_identifiers_of_a_header():
    ids = P.header_identifiers(_ds())
    # whole name, its parts of >= 3 characters ("q" is too short to test on its own), the id, the birth date
    # as YYYYMMDD, YYMMDD, DDMMYYYY, MMDDYYYY and DDMMYY
    assert ids == {"doejohnq", "doe", "john", "mrn0012345", "19800101", "800101", "01011980", "010180"}
    assert P.header_identifiers(pydicom.Dataset()) == frozenset()


def test_identifiers_in_other_scripts():
    """A UTF-8 (ISO_IR 192) name is decoded with the dataset's character set and compared in any script."""
    ds = _ds(name="", pid="", birth="")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Иванов^Пётр"
    ds.PatientBirthDate = "19800731"
    raw = pydicom.dcmread(_roundtrip(ds), force=True)  # as read from a file: raw bytes until converted
    ids = P.header_identifiers(raw)
    assert {"иванов", "пётр"} <= ids
    assert P.path_carries_identifiers("ИВАНОВ_ПЁТР/IM1", ids)
    assert P.path_carries_identifiers("batch/31.07.1980/IM1", ids)  # DD.MM.YYYY


def _roundtrip(ds):
    import io

    from pydicom.dataset import FileMetaDataset

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("rel, carries", [
    ("DOE^JOHN/20240101/IM0001", True),
    ("Doe_John/IM0001", True),                       # another separator and case
    ("exports/MRN0012345/IM1", True),                # the patient id
    ("batch/1980-01-01/IM1", True),                  # the birth date, with dashes
    ("DOE/JOHN_Q/IM1", True),                        # split over two folders
    ("batch7/1.2.840.99.1/IM000123", False),
    ("smith/IM1", False),
])
def test_path_carries_identifiers(rel, carries):
    assert P.path_carries_identifiers(rel, P.header_identifiers(_ds())) is carries
    assert P.path_carries_identifiers(rel, frozenset()) is False


def test_file_token_is_keyed_and_stable():
    key = bytes.fromhex("ab" * 32)
    rel = "DOE^JOHN/IM0001"
    token = P.file_token(rel, key)
    assert token == "f" + hmac.new(key, b"path:" + rel.encode(), hashlib.sha256).hexdigest()[:16]
    assert token == P.file_token(rel, key) and token != P.file_token(rel, bytes.fromhex("ac" * 32))
    assert "doe" not in token.lower()


def test_valid_uid_and_modes():
    assert P.valid_uid("1.2.840.10008.5.1.4.1.1.1") and not P.valid_uid("1.02.3") and not P.valid_uid("../x")
    assert not P.valid_uid("1." * 40)
    assert P.resolve_path_mode("auto", True) == "uid" and P.resolve_path_mode("auto", False) == "relative"
    assert P.resolve_path_mode("relative", True) == "relative"
    with pytest.raises(ValueError, match="path mode must be one of"):
        P.resolve_path_mode("absolute", False)


def test_link_folder(tmp_path):
    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    links = P.LinkFolder(str(tmp_path / "links"))
    dst = links.link(str(a), "1.2.3.dcm")
    assert open(dst, "rb").read() == b"A" and os.path.islink(dst)
    assert links.link(str(a), "1.2.3.dcm") == dst  # kept (a resumed ingest)
    links.link(str(b), "1.2.3.dcm")  # another file under that name replaces the link
    assert open(dst, "rb").read() == b"B"
    q = links.link(str(a), "quarantined/f0011")
    assert open(q, "rb").read() == b"A" and not os.path.exists(q + ".tmp")
