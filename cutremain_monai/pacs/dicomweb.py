"""DICOMweb for the node (issue 29): STOW-RS out, QIDO-RS and WADO-RS in, over ``requests``.

Why ``requests`` and not ``dicomweb-client``: what the node needs from DICOMweb is three requests (a multipart
POST, a JSON GET, a multipart GET) and, around them, what ``dicomweb-client`` does not give: the per-instance
answer of a STOW (status 202 with its ``FailedSOPSequence`` / ``WarningReason`` items, read for every instance
instead of raised as one error), batches bounded in bytes (a folder of results is never read into memory at
once), a bounded number of concurrent requests, and credentials that come only from an environment variable or a
file and never appear in a message. Written on ``requests`` this is one module with no new dependency.

* :class:`DicomWebServer`: the base URL (``http(s)://host:port/dicom-web``), where its credentials are read
  (``auth_env`` / ``auth_file``: ``user:password`` for HTTP basic, anything else a bearer token; a URL holding
  credentials is refused), the CA bundle for TLS, the timeout and the concurrency.
* :func:`stow_files`: every file to the server, ``{path: ""}`` stored (a warning is reported, not a failure) or
  ``{path: reason}`` with the HTTP status or the instance's failure code (never the server's free text, which can
  echo patient data), and whether the failure is permanent.
* :class:`DicomWebClient`: ``search`` (QIDO-RS, paged), ``retrieve_instance`` (WADO-RS).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import pydicom
import requests

__all__ = ["DicomWebServer", "DicomWebClient", "DicomWebError", "stow_files", "parse_multipart", "dicom_json_value"]

logger = logging.getLogger(__name__)

# DICOM JSON tags of a STOW-RS response (PS3.18 10.5.3)
_FAILED_SOP_SEQUENCE, _REFERENCED_SOP_SEQUENCE = "00081198", "00081199"
_SOP_INSTANCE, _FAILURE_REASON, _WARNING_REASON = "00081155", "00081197", "00081196"


class DicomWebError(RuntimeError):
    """A DICOMweb request that did not succeed: the message names the server (never its credentials) and why;
    ``status``: the HTTP status when the server answered (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class DicomWebServer:
    """A DICOMweb service. ``url``: its base (``.../dicom-web``), without credentials; ``auth_env`` / ``auth_file``:
    where ``user:password`` (HTTP basic) or a bearer token is read, when each request session starts; ``auth_type``:
    ``auto`` (basic when the secret holds a colon), ``basic`` or ``bearer``; ``ca_bundle``: the CA certificates
    for ``https``; ``timeout`` seconds per request; ``max_concurrent`` requests at once; ``batch_bytes``: the
    most one STOW request carries."""
    url: str
    auth_env: str | None = None
    auth_file: str | None = None
    auth_type: str = "auto"
    ca_bundle: str | None = None
    timeout: float = 30.0
    max_concurrent: int = 4
    batch_bytes: int = 16 << 20

    def __post_init__(self):
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"a DICOMweb URL is http(s)://host[:port]/path, got {self.safe_url()!r}")
        if parts.username or parts.password:
            raise ValueError("credentials in a DICOMweb URL are not accepted (they would be on the command line "
                             "and in the logs): give them with --auth-env VAR or --auth-file PATH")
        if self.auth_type not in ("auto", "basic", "bearer"):
            raise ValueError(f"auth_type must be auto, basic or bearer, got {self.auth_type!r}")
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {self.max_concurrent}")
        object.__setattr__(self, "url", self.url.rstrip("/"))

    def safe_url(self) -> str:
        """The URL without any user information (for messages)."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"

    def __str__(self) -> str:
        return self.safe_url()

    def secret(self) -> str | None:
        """The credentials, read now from the variable or the file (``None`` without either)."""
        if self.auth_env:
            value = os.environ.get(self.auth_env)
            if value is None:
                raise DicomWebError(f"credentials for {self}: environment variable {self.auth_env} is not set")
            return value.strip()
        if self.auth_file:
            try:
                with open(self.auth_file) as f:
                    return f.read().strip()
            except OSError as e:
                raise DicomWebError(f"credentials for {self}: cannot read the auth file ({type(e).__name__})") from None
        return None

    def session(self) -> requests.Session:
        """A ``requests`` session with the credentials, the CA bundle and a pool of ``max_concurrent``."""
        s = requests.Session()
        secret = self.secret()
        if secret:
            basic = self.auth_type == "basic" or (self.auth_type == "auto" and ":" in secret)
            if basic:
                user, _, password = secret.partition(":")
                s.auth = requests.auth.HTTPBasicAuth(user, password)
            else:
                s.auth = _Bearer(secret.removeprefix("Bearer ").strip())
        s.verify = self.ca_bundle or True
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=self.max_concurrent)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        return s


class _Bearer(requests.auth.AuthBase):
    def __init__(self, token: str):
        self._token = token

    def __call__(self, r):
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:  # never the token
        return "Bearer(***)"


def _reason(r: requests.Response) -> str:
    """``HTTP <code> <phrase>``. Never the body: a server's free-text ``Message`` / ``Details`` can echo what it
    was sent (a Patient ID, a name), and this text goes to logs, retry notes and reports."""
    return f"HTTP {r.status_code} {r.reason or ''}".strip()


# HTTP statuses after which the same request can succeed later (the others, 4xx, are permanent for that request)
_TRANSIENT_HTTP = frozenset([401, 403, 408, 429])


def _retry_after(r: requests.Response) -> float | None:
    """The ``Retry-After`` of an answer in seconds (the delta-seconds form; an HTTP date is read too)."""
    value = r.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
        return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def parse_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a ``multipart/related`` body (WADO-RS), their headers removed."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise DicomWebError(f"not a multipart answer (Content-Type {content_type!r})")
    delimiter = b"--" + m.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        parts.append(data[:-2] if data.endswith(b"\r\n") else data)
    return parts


class DicomWebClient:
    """QIDO-RS and WADO-RS on ``server`` (one session, thread-safe for the concurrent retrievals)."""

    def __init__(self, server: DicomWebServer):
        self.server = server
        self._session = server.session()
        self._lock = threading.Lock()

    def close(self) -> None:
        self._session.close()

    def _get(self, path: str, params=None, accept: str = "application/dicom+json") -> requests.Response:
        url = f"{self.server.url}/{path.lstrip('/')}"
        try:
            r = self._session.get(url, params=params, headers={"Accept": accept}, timeout=self.server.timeout)
        except requests.RequestException as e:
            raise DicomWebError(f"{self.server} unreachable ({type(e).__name__})") from None
        if r.status_code == 204:
            return r
        if r.status_code >= 400:
            raise DicomWebError(f"{self.server}: {_reason(r)}" + (" (check the credentials)" if r.status_code in
                                                                  (401, 403) else ""), status=r.status_code)
        return r

    def search(self, path: str, params: dict | None = None, page: int = 500, max_items: int = 1_000_000) -> list[dict]:
        """QIDO-RS ``path`` (``studies``, ``studies/{uid}/series`` ...) with ``params``: every match (paged). A
        server that ignores ``offset`` (the same page again) or pages past ``max_items`` ends the paging: what was
        new is kept, and the loop never runs for ever."""
        out: list[dict] = []
        seen: set[str] = set()
        while True:
            r = self._get(path, {**(params or {}), "limit": page, "offset": len(out)})
            found = r.json() if r.status_code != 204 and r.content else []
            new = []
            for item in found:
                key = json.dumps(item, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    new.append(item)
            out += new
            if len(found) < page:
                return out
            if not new or len(out) >= max_items:  # no progress: the server does not page
                logger.warning("QIDO-RS paging of %s stopped: the server gave no new match at offset %d",
                               self.server, len(out))
                return out

    def retrieve_instance(self, study: str, series: str, instance: str) -> bytes:
        """WADO-RS of one instance, as its Part 10 bytes (in the transfer syntax the server holds)."""
        r = self._get(f"studies/{study}/series/{series}/instances/{instance}",
                      accept='multipart/related; type="application/dicom"; transfer-syntax=*')
        parts = parse_multipart(r.headers.get("Content-Type", ""), r.content)
        if len(parts) != 1:
            raise DicomWebError(f"{self.server}: {len(parts)} parts for one instance")
        return parts[0]


def _value(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _sop_uid(path: str) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    return str(ds.SOPInstanceUID)


def _batches(paths: Sequence[str], limit: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for p in paths:
        n = os.path.getsize(p)
        if batch and size + n > limit:
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += n
    if batch:
        yield batch


_TRANSIENT_FAILURE_CLASS = 0xA7  # FailureReason A7xx: refused, out of resources (PS3.4 B.2.3): later may do


def _stow_post(session: requests.Session, server: DicomWebServer, paths: Sequence[str]):
    """One STOW-RS request with ``paths``, read now: the answer, or ``None`` when the server could not be reached
    (and the exception type)."""
    boundary = uuid.uuid4().hex
    body = bytearray()
    for p in paths:
        with open(p, "rb") as f:
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    try:
        return session.post(f"{server.url}/studies", data=bytes(body), headers=headers, timeout=server.timeout), ""
    except requests.RequestException as e:
        return None, type(e).__name__


def _stow_batch(session: requests.Session, server: DicomWebServer, batch: dict[str, str], warnings: dict[str, str],
                info: dict[str, dict]) -> dict[str, str]:
    """One STOW-RS request with the files of ``batch`` (``{path: SOP Instance UID}``); the answer per file: ""
    stored, else the reason. The per-instance answer is trusted whatever the HTTP status (Orthanc answers 400 to a
    batch with one bad instance: the others are stored, and must not be sent again). A 413 splits the batch in
    two. ``info[path]``: ``{"permanent": True}`` for a failure that the same request will meet again (a 4xx other
    than 401 / 403 / 408 / 429, a ``FailureReason`` other than A7xx), ``{"retry_after": s}`` when the server said
    when to come back."""
    r, error = _stow_post(session, server, list(batch))
    if r is None:
        return {p: f"STOW-RS to {server} failed ({error})" for p in batch}
    if r.status_code == 413 and len(batch) > 1:  # too large: the halves, each on its own
        items = list(batch.items())
        half = len(items) // 2
        return {**_stow_batch(session, server, dict(items[:half]), warnings, info),
                **_stow_batch(session, server, dict(items[half:]), warnings, info)}
    answer: dict = {}
    try:
        parsed = r.json() if r.content else {}
        answer = parsed[0] if isinstance(parsed, list) and parsed else parsed if isinstance(parsed, dict) else {}
    except ValueError:
        pass
    failed = {_value(i, _SOP_INSTANCE): _value(i, _FAILURE_REASON)
              for i in (answer.get(_FAILED_SOP_SEQUENCE) or {}).get("Value", []) if isinstance(i, dict)}
    stored = {_value(i, _SOP_INSTANCE): _value(i, _WARNING_REASON)
              for i in (answer.get(_REFERENCED_SOP_SEQUENCE) or {}).get("Value", []) if isinstance(i, dict)}
    wait = _retry_after(r)
    result = {}
    for p, uid in batch.items():
        if uid in stored and uid not in failed:
            result[p] = ""
            if stored[uid] is not None or r.status_code == 202:
                why = f"warning reason 0x{int(stored[uid]):04X}" if stored[uid] is not None else "status 202"
                warnings[p] = why
                logger.warning("result %s stored with a warning (%s)", os.path.basename(p), why)
        elif uid in failed:
            code = failed[uid]
            try:
                code = int(code)
            except (TypeError, ValueError):
                code = None
            result[p] = f"STOW-RS failure reason 0x{code:04X}" if code is not None else "STOW-RS failure"
            if code is None or code >> 8 != _TRANSIENT_FAILURE_CLASS:
                info[p] = {"permanent": True}
        elif r.status_code >= 400:
            result[p] = f"STOW-RS to {server}: {_reason(r)}"
            if r.status_code < 500 and r.status_code not in _TRANSIENT_HTTP:
                info[p] = {"permanent": True}
        else:
            result[p] = f"STOW-RS to {server}: {_reason(r)}, instance not in the answer"
        if result[p] and wait is not None and not info.get(p, {}).get("permanent"):
            info[p] = {"retry_after": wait}
    return result


def stow_files(paths: Sequence[str], server: DicomWebServer, warnings: dict[str, str] | None = None,
               info: dict[str, dict] | None = None) -> dict[str, str]:
    """STOW-RS every file of ``paths`` to ``server``, in requests of at most ``server.batch_bytes`` and at most
    ``server.max_concurrent`` at once; ``{path: ""}`` stored, ``{path: reason}`` not (the HTTP status, or the
    failure reason of the instance: never the server's free text). Instances stored with a warning are "" and
    listed in ``warnings`` (``{path: why}``) and in the log; ``info`` gets, per failed path, whether the failure is
    permanent (``{"permanent": True}``: sending it again cannot help) or when to try again (``{"retry_after": s}``).
    """
    warnings = {} if warnings is None else warnings
    info = {} if info is None else info
    result: dict[str, str] = {}
    readable: dict[str, str] = {}
    for p in paths:
        try:
            readable[p] = _sop_uid(p)
        except Exception as e:
            result[p] = f"unreadable ({type(e).__name__})"
            info[p] = {"permanent": True}
    if not readable:
        return result
    try:
        session = server.session()
    except DicomWebError as e:
        return {**result, **{p: str(e) for p in readable}}
    try:
        with ThreadPoolExecutor(server.max_concurrent) as pool:
            jobs = [pool.submit(_stow_batch, session, server, {p: readable[p] for p in batch}, warnings, info)
                    for batch in _batches(list(readable), server.batch_bytes)]
            for job in jobs:
                result.update(job.result())
    finally:
        session.close()
    return result


def dicom_json_value(item: dict, keyword: str):
    """The first value of attribute ``keyword`` in a QIDO-RS result item (``None`` when absent)."""
    return _value(item, f"{pydicom.datadict.tag_for_keyword(keyword):08X}")

