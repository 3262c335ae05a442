"""Shared fixtures: where the real data and the committed samples are, and DICOM validators."""

import logging
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
SHARED_MONAI = os.path.normpath(os.path.join(ROOT, "..", "shared", "monai"))
SAMPLES = os.path.join(ROOT, "dicom_samples")

logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
# a fixed test key for keyed pseudonyms (cutremain_monai.io.pseudonyms): runs are reproducible and no test writes a
# key file into the user's config folder (subprocesses inherit it)
TEST_PSEUDONYM_KEY = "5e" * 32
os.environ.setdefault("CUTREMAIN_PSEUDONYM_KEY", TEST_PSEUDONYM_KEY)


def shared_data(*parts) -> str:
    """Path under ../shared/data; skips the test when it is absent."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"real data not available: {path}")
    return path


def dciodvfy_errors(path: str) -> list[str]:
    """Error lines of dicom3tools' dciodvfy for ``path`` (fails the test when the tool is missing)."""
    tool = shutil.which("dciodvfy")
    assert tool, "dciodvfy (Debian package dicom3tools) is required; .ci/run installs it"
    out = subprocess.run([tool, path], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def dcmpschk_ok(path: str) -> tuple[bool, str]:
    tool = shutil.which("dcmpschk")
    assert tool, "dcmpschk (Debian package dcmtk) is required; .ci/run installs it"
    out = subprocess.run([tool, path], capture_output=True, text=True)
    text = out.stdout + out.stderr
    return ("Test passed" in text and "E:" not in text), text
