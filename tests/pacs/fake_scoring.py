"""A stand-in for a bundle's scoring, for the node tests: light to import (the scoring process imports it at
every start), so a test's time goes to what it checks."""

import glob
import os
import signal
import time

import numpy as np
import pydicom


def fake_score(bundle, configs, settings):
    """A stand-in for the bundle (run in the scoring process): one Secondary Capture per image, with UIDs new at
    every call, so a study scored twice shows as two results in Orthanc (which would silently keep one copy of a
    resent instance with the same UID). A study described ``CRASH`` kills the process. With ``gate`` (a folder):
    the call after ``block_after`` calls marks ``gate/blocked`` and waits there for ever (a scoring cut short,
    without a sleep to guess)."""
    from cutremain_monai.io.secondary_capture import write_secondary_capture

    gate = settings.get("gate")
    if gate:
        calls = len([f for f in os.listdir(gate) if f.startswith("call")])
        open(os.path.join(gate, f"call{calls}"), "w").close()
        if calls >= int(settings.get("block_after", 1)):
            open(os.path.join(gate, "blocked"), "w").close()
            while True:
                time.sleep(0.05)
    out = settings["dicom_out_dir"]
    os.makedirs(out, exist_ok=True)
    series = pydicom.uid.generate_uid()
    files = []
    for p in sorted(glob.glob(os.path.join(settings["input_dir"], "*.dcm"))):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if str(ds.get("StudyDescription", "")) == "CRASH":
            os.kill(os.getpid(), signal.SIGSEGV)  # a decoder's segmentation fault
        uid = pydicom.uid.generate_uid()
        path = os.path.join(out, uid + ".dcm")
        write_secondary_capture(ds, np.zeros((64, 64, 3), np.uint8), ["test"], path, sop_instance_uid=uid,
                                series_instance_uid=series)
        files.append(path)
    return {"files": files, "not_written": 0}
