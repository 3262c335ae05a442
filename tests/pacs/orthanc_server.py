"""A real Orthanc for the tests (Debian packages ``orthanc`` and ``orthanc-dicomweb``; .ci/run installs them), on
127.0.0.1 with a temporary configuration and storage folder; stopped and started again on the same ports and
storage (a PACS that goes down and comes back)."""

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import free_port

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def wait_for(cond, timeout: float = 90.0, step: float = 0.2) -> bool:
    """Poll ``cond()`` until it is true (True) or ``timeout`` seconds pass (False)."""
    t = time.time()
    while time.time() - t < timeout:
        if cond():
            return True
        time.sleep(step)
    return False


def http(url, data=None, method=None, auth=None):
    """A JSON (or raw) answer of Orthanc's REST API; ``data``: bytes, or an object sent as JSON."""
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None and not isinstance(data, bytes):
        req.data = json.dumps(data).encode()
    if auth:
        import base64

        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=60) as r:
        body = r.read()
    try:
        return json.loads(body)
    except ValueError:
        return body


class Orthanc:
    """One Orthanc process. ``dicomweb``: load the DICOMweb plugin (skips the test when absent); ``users``:
    ``{user: password}`` turns HTTP authentication on; ``modalities``: Orthanc's ``DicomModalities``."""

    def __init__(self, tmp_path, dicomweb: bool = False, users: dict | None = None, modalities: dict | None = None):
        exe = shutil.which("Orthanc")
        if exe is None:
            pytest.skip("Orthanc is not installed (Debian package orthanc; .ci/run installs it)")
        if dicomweb and not os.path.exists(DICOMWEB_PLUGIN):
            pytest.skip(f"the Orthanc DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; Debian package "
                        "orthanc-dicomweb, .ci/run installs it)")
        self.exe, self.tmp = exe, tmp_path
        self.dicom_port, self.http_port = free_port(), free_port()
        self.auth = next((f"{u}:{p}" for u, p in (users or {}).items()), None)
        config = {"Name": "cutremain-test", "StorageDirectory": str(tmp_path / "orthanc-db"),
                  "IndexDirectory": str(tmp_path / "orthanc-db"), "DicomAet": "ORTHANC", "DicomPort": self.dicom_port,
                  "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
                  "RegisteredUsers": users or {}, "DicomModalities": modalities or {},
                  "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
                  "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [], "StableAge": 1, "HttpTimeout": 60,
                  "DicomScuTimeout": 30, "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "MainDicomTags"}}
        self.config = tmp_path / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = self.url + "/dicom-web"
        self.proc = None
        self.start()

    def start(self) -> None:
        self.log = open(self.tmp / "orthanc.log", "a")
        self.proc = subprocess.Popen([self.exe, str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(150):
            try:
                http(self.url + "/system", auth=self.auth)
                return
            except Exception:
                if self.proc.poll() is not None:
                    pytest.fail("Orthanc exited: " + open(self.tmp / "orthanc.log").read()[-2000:])
                time.sleep(0.2)
        self.stop()
        pytest.fail("Orthanc did not start: " + open(self.tmp / "orthanc.log").read()[-2000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.log.close()

    def get(self, path: str):
        return http(self.url + path, auth=self.auth)

    def post(self, path: str, data):
        return http(self.url + path, data, auth=self.auth)

    def sop_uids(self, modality: str | None = None) -> list[str]:
        """The SOP Instance UIDs Orthanc holds (of ``modality``), one per stored instance."""
        out = []
        for inst in self.get("/instances?expand"):
            tags = inst["MainDicomTags"]
            if modality is None or self.get(f"/instances/{inst['ID']}/tags?simplify").get("Modality") == modality:
                out.append(tags["SOPInstanceUID"])
        return out
