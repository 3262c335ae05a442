"""Keyed pseudonyms: HMAC-SHA256 with the site key; the key's sources, permissions and errors."""

import hashlib
import hmac
import logging
import os
import stat

import pytest

from cutremain_monai.io import pseudonyms as P
from cutremain_monai.io.importers import pseudonym


def test_group_is_hmac_of_the_id_and_not_computable_without_the_key(monkeypatch):
    key = bytes.fromhex("ab" * 32)
    monkeypatch.setenv(P.KEY_ENV, key.hex())
    mrn = "12345678"
    got = P.keyed_pseudonym(mrn)
    assert got == hmac.new(key, mrn.encode(), hashlib.sha256).hexdigest()[:16]  # by hand
    assert got == P.keyed_pseudonym(mrn) and got != P.keyed_pseudonym("12345679")  # stable, distinct
    # whoever has the datalist and the list of MRNs but not the key: neither the unkeyed form nor plain hashes match
    candidates = {pseudonym(mrn), hashlib.sha256(mrn.encode()).hexdigest()[:16],
                  hmac.new(b"", mrn.encode(), hashlib.sha256).hexdigest()[:16],
                  P.keyed_pseudonym(mrn, key=bytes.fromhex("ac" * 32))}
    assert got not in candidates


def test_key_file_variable_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(P.KEY_ENV, raising=False)
    f = tmp_path / "site.key"
    f.write_text("cd" * 32 + "\n")
    monkeypatch.setenv(P.KEY_FILE_ENV, str(f))
    assert P.site_key() == bytes.fromhex("cd" * 32)
    monkeypatch.setenv(P.KEY_FILE_ENV, str(tmp_path / "missing.key"))
    with pytest.raises(P.PseudonymKeyError, match="no key file at .*missing.key"):
        P.site_key()
    monkeypatch.setenv(P.KEY_ENV, "not hex")
    with pytest.raises(P.PseudonymKeyError, match=r"\$CUTREMAIN_PSEUDONYM_KEY: the pseudonym key must be hexadecimal"):
        P.site_key()
    monkeypatch.setenv(P.KEY_ENV, "abcd")
    with pytest.raises(P.PseudonymKeyError, match="2 bytes"):
        P.site_key()


def test_generated_once_owner_only_and_never_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(P.KEY_ENV, raising=False)
    monkeypatch.delenv(P.KEY_FILE_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    with caplog.at_level(logging.WARNING, logger="cutremain_monai.io.pseudonyms"):
        key = P.site_key()
    path = tmp_path / "cfg" / "cutremain" / "pseudonym.key"
    assert path.is_file() and len(key) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert str(path) in caplog.text and key.hex() not in caplog.text
    caplog.clear()
    assert P.site_key() == key and not caplog.text  # the same key on the next run, no new file
