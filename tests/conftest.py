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


def _threads_per_worker() -> int:
    """Cores shared out among the pytest-xdist workers: two workers of torch's default (every core each) on a 2-core
    machine run 4 threads on 2 cores and lose about a third of their speed to each other (measured: two bundle test
    files took 68 s that way and 47 s with one thread each)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


if "PYTEST_XDIST_WORKER" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(_threads_per_worker())  # the bundle runs the tests start inherit it
    torch.set_num_threads(_threads_per_worker())


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


_MLFLOW_TEMPLATE: dict = {}  # path of an empty MLflow store with its tables, made once per test process


def mlflow_db(folder, name: str = "mlruns.db") -> str:
    """``sqlite:///<folder>/<name>``, the file made as a copy of an empty store with its tables (made once per test
    process), so opening it does not run MLflow's migrations again. An existing file is kept."""
    folder = str(folder)
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        if "path" not in _MLFLOW_TEMPLATE:
            import atexit
            import tempfile

            import mlflow

            folder_t = tempfile.mkdtemp(prefix="mlflow_template_")
            atexit.register(shutil.rmtree, folder_t, True)
            template = os.path.join(folder_t, "template.db")
            mlflow.MlflowClient(tracking_uri="sqlite:///" + template).search_experiments()  # creates the tables
            _MLFLOW_TEMPLATE["path"] = template
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(_MLFLOW_TEMPLATE["path"], path)
    return "sqlite:///" + path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it): DDP tests running side by side under xdist, or beside
    another test run, never share a rendezvous port."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
