"""Keyed pseudonyms of patient identifiers: HMAC-SHA256 with a per-site secret key.

A hospital's patient IDs (MRNs) are short and enumerable, so an unkeyed hash of them (a public salt and SHA-256)
is reversed by anyone holding the datalist and the list of IDs: hash every ID and compare. With a secret key only
the key's holder can recompute a group; the same key gives the same groups on every run and machine, which keeps
a patient on one side of a split as new exports arrive.

The key (32 bytes, hex) comes from, in order:

1. ``CUTREMAIN_PSEUDONYM_KEY`` (hex in the environment; for CI and containers, from the secret store);
2. ``CUTREMAIN_PSEUDONYM_KEY_FILE`` (a file holding the hex key);
3. the user's key file ``$XDG_CONFIG_HOME/cutremain/pseudonym.key`` (``~/.config/...``), generated on first use
   with owner-only permissions (0600, folder 0700) and one log line saying where (never the key itself).

Sites that pool data share one key file through their secret channel (the groups then agree across sites); a
key is rotated by pointing the variable at a new key and re-ingesting: groups change, so splits made with the old
key must not be mixed with new ones. The key is never written to the repository, datalists, logs or MLflow.

Public datasets keep :func:`cutremain_monai.io.importers.pseudonym` (their IDs are public anyway, and an unkeyed
group keeps published splits reproducible everywhere); exports from a hospital go through :func:`keyed_pseudonym`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets

__all__ = ["KEY_ENV", "KEY_FILE_ENV", "PseudonymKeyError", "default_key_path", "site_key", "keyed_pseudonym"]

logger = logging.getLogger(__name__)
KEY_ENV = "CUTREMAIN_PSEUDONYM_KEY"
KEY_FILE_ENV = "CUTREMAIN_PSEUDONYM_KEY_FILE"
_KEY_BYTES = 32


class PseudonymKeyError(ValueError):
    """The pseudonym key is unusable (message names where it came from, never its value)."""


def default_key_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "cutremain", "pseudonym.key")


def _parse(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise PseudonymKeyError(f"{where}: the pseudonym key must be hexadecimal") from None
    if len(key) < 16:
        raise PseudonymKeyError(f"{where}: the pseudonym key is {len(key)} bytes; use at least 16 (32 recommended)")
    return key


def _generate(path: str) -> bytes:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    key = secrets.token_bytes(_KEY_BYTES)
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:  # written and synced before it gets its name: never an empty key file
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # atomic, and fails when another process made the key first
    except FileExistsError:
        with open(path) as f:
            return _parse(f.read(), path)
    finally:
        os.unlink(tmp)
    logger.warning("generated a new pseudonym key at %s (owner-only); keep it: the same key gives the same patient "
                   "groups, and sites that pool data must share it", path)
    return key


def site_key() -> bytes:
    """The site's key (see the module docstring for where it comes from)."""
    value = os.environ.get(KEY_ENV)
    if value:
        return _parse(value, f"${KEY_ENV}")
    path = os.environ.get(KEY_FILE_ENV)
    if path:
        if not os.path.isfile(path):
            raise PseudonymKeyError(f"${KEY_FILE_ENV}: no key file at {path}")
        with open(path) as f:
            return _parse(f.read(), path)
    path = default_key_path()
    if os.path.isfile(path):
        with open(path) as f:
            return _parse(f.read(), path)
    return _generate(path)


def keyed_pseudonym(patient_id, key: bytes | None = None) -> str:
    """16 hex digits of HMAC-SHA256(key, patient id): stable for one key, not computable without it."""
    key = site_key() if key is None else key
    return hmac.new(key, str(patient_id).encode(), hashlib.sha256).hexdigest()[:16]
