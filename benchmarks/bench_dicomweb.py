"""A DICOMweb round trip against a real Orthanc (Debian orthanc + orthanc-dicomweb) on 127.0.0.1: STOW-RS of N small
DX files (``stow_files``), QIDO-RS of the new studies, WADO-RS of every instance back (``fetch_new``, the path of
``cutremain watch`` and ``ingest --dicomweb``), with HTTP basic authentication on, as a hospital would run it.

    python benchmarks/bench_dicomweb.py [N]      (default 200)

Last line: one JSON object with the seconds of each step and of the whole round trip, and instances per second.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cutremain_monai.io.dx_writer import write_dx  # noqa: E402
from cutremain_monai.pacs.dicomweb import DicomWebClient, DicomWebServer, stow_files  # noqa: E402
from cutremain_monai.pacs.watch import fetch_new  # noqa: E402

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(n: int) -> dict:
    exe = shutil.which("Orthanc")
    if exe is None or not os.path.exists(PLUGIN):
        raise SystemExit("needs Orthanc and its DICOMweb plugin (Debian orthanc, orthanc-dicomweb)")
    tmp = tempfile.mkdtemp(prefix="bench_dicomweb_")
    port = free_port()
    config = {"Name": "bench", "StorageDirectory": f"{tmp}/db", "IndexDirectory": f"{tmp}/db", "HttpPort": port,
              "DicomPort": free_port(), "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
              "RegisteredUsers": {"bench": "bench-pw"}, "Plugins": [PLUGIN],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "MainDicomTags"}}
    with open(f"{tmp}/orthanc.json", "w") as f:
        json.dump(config, f)
    log = open(f"{tmp}/orthanc.log", "w")
    proc = subprocess.Popen([exe, f"{tmp}/orthanc.json"], stdout=log, stderr=subprocess.STDOUT)
    try:
        os.environ["BENCH_DICOMWEB_AUTH"] = "bench:bench-pw"
        server = DicomWebServer(f"http://127.0.0.1:{port}/dicom-web", auth_env="BENCH_DICOMWEB_AUTH", timeout=60)
        client = DicomWebClient(server)
        for _ in range(150):
            try:
                client.search("studies", {"StudyDate": "20000101-"})
                break
            except Exception:
                time.sleep(0.2)
        rng = np.random.default_rng(0)
        files = []
        for i in range(n):  # 256 x 256 16-bit DX, studies of 10 images
            p = f"{tmp}/in/{i:04d}.dcm"
            os.makedirs(os.path.dirname(p), exist_ok=True)
            write_dx(p, rng.integers(0, 4096, (256, 256), dtype=np.uint16), uid_seed=f"bench{i}",
                     patient_id=f"B{i // 10}")
            files.append(p)
        t0 = time.perf_counter()
        result = stow_files(files, server)
        t_stow = time.perf_counter() - t0
        assert all(r == "" for r in result.values()), {r for r in result.values() if r}
        got: list[int] = []
        t1 = time.perf_counter()
        count, _ = fetch_new(client, ("DX",), None, lambda uid: False, lambda raw, _sop: got.append(len(raw)))
        t_back = time.perf_counter() - t1
        assert count == n == len(got), (count, len(got))
        total = time.perf_counter() - t0
        return {"instances": n, "stow_s": round(t_stow, 2), "qido_wado_s": round(t_back, 2),
                "round_trip_s": round(total, 2), "instances_per_s": round(2 * n / total, 1),
                "mb": round(sum(os.path.getsize(p) for p in files) / 1e6, 1)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)))
