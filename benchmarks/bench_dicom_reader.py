"""Reader speed on a generated 2048x2048 16-bit uncompressed DX, measured against references in the same run.

ours     : cutremain_monai read_xray_dicom -> float32 torch tensor, modality LUT + window + inversion applied
monai    : monai.transforms.LoadImage(reader="PydicomReader") (no VOI, no inversion, transposed)
pydicom  : bare pydicom.dcmread(path).pixel_array (stored values, nothing applied)

Last line: one JSON object with ratio_vs_monai and ratio_vs_pydicom (our images/s over theirs).
Targets: ratio_vs_monai >= 10, ratio_vs_pydicom >= 0.5.
"""

import json
import logging
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pydicom
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cutremain_monai.io.dicom import read_xray_dicom  # noqa: E402
from cutremain_monai.io.dx_writer import write_dx  # noqa: E402

logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


def rate(fn, repeats):
    fn()  # warm-up (page cache, imports)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times)


def main():
    import warnings

    from monai.transforms import LoadImage

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dx.dcm")
        px = np.random.default_rng(0).integers(0, 2**14, size=(2048, 2048), dtype=np.uint16)
        write_dx(path, px, photometric="MONOCHROME1", bits_stored=14, window=(8000, 12000), uid_seed="bench")

        def ours():
            img, _ = read_xray_dicom(path)
            return torch.from_numpy(img)

        monai_loader = LoadImage(reader="PydicomReader", image_only=True)
        ours_ips = rate(ours, 30)
        pydicom_ips = rate(lambda: pydicom.dcmread(path).pixel_array, 30)
        monai_ips = rate(lambda: monai_loader(path), 10)
    result = {
        "image": "2048x2048 16-bit (14 stored) MONOCHROME1 DX, explicit VR little endian",
        "ours_images_per_s": round(ours_ips, 1),
        "monai_pydicomreader_images_per_s": round(monai_ips, 1),
        "bare_pydicom_images_per_s": round(pydicom_ips, 1),
        "ratio_vs_monai": round(ours_ips / monai_ips, 2),
        "ratio_vs_pydicom": round(ours_ips / pydicom_ips, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
