"""How a file is named in what we write, when the export's own folder and file names carry the patient.

PACS exports are often laid out as ``DOE^JOHN/19800101/IM0001``; a datalist, a quarantine report or a prediction
row that repeats such a path carries the patient's name further. Three path modes:

* ``relative``: files are named relative to the export root; a datalist holds ``image`` (relative) and a
  top-level ``root`` (resolved when loading, :func:`cutremain_monai.io.datalist.load_datalist`), so moving the
  export means editing one field.
* ``uid``: files are named by their SOP Instance UID (``<uid>.dcm``) through a *link folder* written beside the
  datalist (symbolic links to the originals; hard links, then copies, where the file system has no symbolic
  links). Files without a usable UID (unreadable, not DICOM) are named by a keyed token of their relative path
  (:func:`file_token`, HMAC with the site key: the same file gets the same token across runs, and the token
  does not reveal the path) and linked under ``quarantined/``. The link folder is the only place that maps our
  names back to the export; it belongs with the export (its links point into it).
* ``auto`` (the default of ``cutremain ingest`` and folder inference): ``uid`` when any relative path carries an
  identifier read from a header (:func:`path_carries_identifiers`), else ``relative``.

The identifier check is deliberately loose (normalised substrings of every path component, name parts of three
characters or more): a false alarm only means files are named by UID. Identifier values are compared in memory
and never written or logged.
"""

from __future__ import annotations

import os
import re
import shutil
import unicodedata
from typing import Union

from cutremain_monai.io.pseudonyms import keyed_pseudonym

__all__ = ["PathLike", "unique_stem", "PATH_MODES", "header_identifiers", "path_carries_identifiers", "file_token", "LinkFolder",
           "resolve_path_mode", "valid_uid"]

PathLike = Union[str, os.PathLike]  # a file path, as ``monai.config.PathLike`` (without importing MONAI)
PATH_MODES = ("auto", "relative", "uid")
QUARANTINED = "quarantined"

# (0010,0010) PatientName, (0010,0020) PatientID, (0010,0030) PatientBirthDate, (0010,1000) OtherPatientIDs,
# (0010,1001) OtherPatientNames, (0010,1060) PatientMotherBirthName
_IDENTIFIER_TAGS = (0x00100010, 0x00100020, 0x00100030, 0x00101000, 0x00101001, 0x00101060)
_UID_SYNTAX = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")  # PS3.5 9.1


def valid_uid(uid: str) -> bool:
    """A UID as PS3.5 9.1 allows (digits and dots, no leading zeros, at most 64 characters): safe as a file name."""
    return 0 < len(uid) <= 64 and bool(_UID_SYNTAX.match(uid))


def _norm(text: str) -> str:
    """Case-folded letters and digits of any script (NFKC: full-width forms and ligatures fold too)."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold() if c.isalnum())


def _raw(ds, tag: int) -> str:
    """An element's text decoded with the dataset's character set but without pydicom's value conversion (whose
    validation logs invalid values)."""
    try:
        elem = ds.get_item(tag)
    except Exception:  # a corrupt element: nothing to compare
        return ""
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        try:
            from pydicom.charset import convert_encodings, decode_bytes

            charset = ds.get_item(0x00080005)
            terms = charset.value if charset is not None else None
            if isinstance(terms, (bytes, bytearray)):
                terms = bytes(terms).decode("ascii", "replace").split("\\")
            return decode_bytes(bytes(value), convert_encodings(terms), set("^=\\"))
        except Exception:
            return bytes(value).decode("latin-1", "replace")
    return str(value or "")


def header_identifiers(ds) -> frozenset[str]:
    """Normalised (case-folded alphanumeric, any script) identifiers of a dataset: the patient's name (whole and
    each part of three characters or more, split at ``^``, ``=``, spaces and ``\\``; decoded with its Specific
    Character Set), IDs, birth date (YYYYMMDD, YYMMDD, DDMMYYYY, MMDDYYYY, DDMMYY) and mother's birth name."""
    found = set()
    for tag in _IDENTIFIER_TAGS:
        text = _raw(ds, tag)
        if not text.strip(" \x00"):
            continue
        whole = _norm(text)
        if len(whole) >= 3:
            found.add(whole)
        for part in re.split(r"[\^=\\ ,]+", text):
            part = _norm(part)
            if len(part) >= 3:
                found.add(part)
        if tag == 0x00100030 and len(whole) == 8 and whole.isdigit():  # a birth date as exports write it
            y, m, d = whole[:4], whole[4:6], whole[6:]
            found.update({y[2:] + m + d, d + m + y, m + d + y, d + m + y[2:]})
    return frozenset(found)


def path_carries_identifiers(relpath: str, identifiers) -> bool:
    """Whether any component of ``relpath`` contains one of ``identifiers`` (normalised as
    :func:`header_identifiers` gives them)."""
    if not identifiers:
        return False
    parts = [_norm(p) for p in re.split(r"[\\/]+", relpath) if p]
    parts.append("".join(parts))  # a name split over two folders (DOE/JOHN)
    return any(ident in part for part in parts for ident in identifiers)


def file_token(relpath: str, key: bytes | None = None) -> str:
    """A stable name for a file that has no usable SOP Instance UID: ``f`` + 16 hex digits of
    HMAC-SHA256(site key, relative path)."""
    return "f" + keyed_pseudonym("path:" + relpath.replace(os.sep, "/"), key)


def resolve_path_mode(mode: str, carries: bool) -> str:
    if mode not in PATH_MODES:
        raise ValueError(f"path mode must be one of {PATH_MODES}, got {mode!r}")
    return ("uid" if carries else "relative") if mode == "auto" else mode


class LinkFolder:
    """A folder of links named by SOP Instance UID (or file token) to the files of an export.

    ``link(src, name)`` makes ``folder/name`` point at ``src`` (absolute); an existing link to the same file is
    kept (a resumed ingest), one to another file is replaced. Symbolic links first; where they are not allowed
    (some Windows and network shares) a hard link, then a copy.
    """

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        os.makedirs(self.folder, exist_ok=True)

    def link(self, src: str, name: str) -> str:
        dst = os.path.join(self.folder, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        src = os.path.abspath(src)
        if os.path.islink(dst):
            if os.readlink(dst) == src:
                return dst
            os.unlink(dst)
        elif os.path.exists(dst):
            if os.path.samefile(dst, src):
                return dst
            os.unlink(dst)
        tmp = dst + ".tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        try:
            os.symlink(src, tmp)
        except OSError:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
        os.replace(tmp, dst)  # atomic: a killed ingest never leaves a half-made link under the final name
        return dst


def unique_stem(path: str, seen: dict) -> str:
    """The file name of ``path`` without its extension, made unique among the names ``seen`` so far (``IM1``,
    ``IM1_1``, ...); ``seen`` counts each stem and is updated."""
    stem = os.path.splitext(os.path.basename(path))[0]
    n = seen.get(stem, 0)
    seen[stem] = n + 1
    return stem if n == 0 else f"{stem}_{n}"
