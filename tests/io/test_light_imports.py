"""The light io layer (issue 27): reading DICOM, decoding images, writing datalists and ingesting load neither torch
nor MONAI (nor highdicom, which only the writers of presentation states, SR and SEG need), so ingest workers start
in a fraction of a second; the MONAI-facing names still work where they were.

The checks run in fresh interpreters (this test process has torch loaded already)."""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("torch", "monai", "highdicom")
LIGHT_MODULES = (
    "cutremain_monai.io",
    "cutremain_monai.io.dicom",
    "cutremain_monai.io.decode",
    "cutremain_monai.io.datalist",
    "cutremain_monai.io.boxes",
    "cutremain_monai.io.paths",
    "cutremain_monai.io.pseudonyms",
    "cutremain_monai.io.importers",
    "cutremain_monai.io.near_duplicates",
    "cutremain_monai.io.gsps",
    "cutremain_monai.io.sr",
    "cutremain_monai.io.dx_writer",
    "cutremain_monai.io.ingest",
)


def _python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter at the repository root; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_light_modules_import_neither_torch_nor_monai():
    # one interpreter, the modules imported one after the other and the heavy ones looked for after each: the
    # first module that pulls torch or MONAI in is named (each is checked as if alone, since none before it did)
    code = f"""
import importlib, json, sys
found = {{}}
for name in {LIGHT_MODULES!r}:
    importlib.import_module(name)
    heavy = [m for m in {HEAVY!r} if m in sys.modules]
    if heavy:
        found[name] = heavy
        break
print(json.dumps(found))
"""
    assert _python(code) == {}


def test_decoding_a_dicom_and_writing_a_datalist_stay_light(tmp_path):
    """Not only the imports: reading a radiograph (DICOM and PNG), thumbnails and saving a datalist load no torch."""
    code = f"""
import json, sys
import numpy as np
from cutremain_monai.io.decode import decode_image, decode_xray, save_png16
from cutremain_monai.io.datalist import save_datalist
from cutremain_monai.io.dicom import read_xray_dicom
from cutremain_monai.io.dx_writer import write_dx
from cutremain_monai.io.near_duplicates import thumbnail
d = {str(tmp_path)!r}
write_dx(d + "/a.dcm", (np.arange(64 * 48).reshape(64, 48) % 4096).astype(np.uint16), bits_stored=12)
img, meta = read_xray_dicom(d + "/a.dcm")
png = save_png16(d + "/a.png", img)
sizes = [decode_image(d + "/a.dcm"), decode_image(png)]
thumbnail(decode_xray(png)[0])
save_datalist({{"training": [{{"image": "a.dcm", "label": 1}}], "validation": [], "test": []}}, d + "/dl.json")
print(json.dumps({{"sizes": sizes, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    got = _python(code)
    assert got == {"sizes": [[64, 48], [64, 48]], "heavy": []}


def _worker_modules(task) -> dict:
    """Run in an ingest worker process: which heavy modules it holds, and when it answered."""
    return {"heavy": [m for m in HEAVY if m in sys.modules], "pid": os.getpid(), "t": time.time(), "task": task}


def test_ingest_workers_are_light():
    """The worker processes of ``ingest(workers=2)`` (forks of the fork server that preloads the ingest module)
    hold neither torch nor MONAI, even when the calling process does (as this test process does)."""
    from cutremain_monai.io import ingest as I

    t = time.time()
    got = list(I._in_processes(iter([("a", "a", b""), ("b", "b", b""), ("c", "c", b"")]), 2, _worker_modules))
    assert [g["task"][0] for g in got] == ["a", "b", "c"]
    assert all(g["heavy"] == [] for g in got), got
    assert all(g["pid"] != os.getpid() for g in got)
    print(f"first worker answer after {min(g['t'] for g in got) - t:.2f} s")  # fork server start included


def test_monai_facing_names_still_work(tmp_path):
    """``cutremain_monai.io.XrayDicomReader`` (loads the MONAI module on demand) and the short reader name."""
    code = f"""
import json, sys
import numpy as np
import cutremain_monai.io as io
from cutremain_monai.io.dx_writer import write_dx
before = [m for m in {HEAVY!r} if m in sys.modules]
reader = io.XrayDicomReader
from monai.transforms import LoadImage
from cutremain_monai.io.loader import XrayDicomReader
write_dx({str(tmp_path)!r} + "/a.dcm", np.arange(12 * 10, dtype=np.uint16).reshape(12, 10), bits_stored=12)
img = LoadImage(reader="XrayDicomReader", image_only=True)({str(tmp_path)!r} + "/a.dcm")
print(json.dumps({{"before": before, "same": reader is XrayDicomReader, "shape": list(img.shape)}}))
"""
    assert _python(code) == {"before": [], "same": True, "shape": [1, 12, 10]}
