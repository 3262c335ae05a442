"""``make demo``: ingest the embedded ``dicom_samples/`` as a PACS export and print the report.

(The clavicle bundle issue turns this into baseline vs Cut&Remain training; until then the demo shows the
front door: DICOM in, validated datalist and quarantine report out.)
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv=None) -> int:
    from cutremain_monai.io.ingest import ingest

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    samples = os.path.join(root, "dicom_samples")
    out_dir = os.path.join(root, "outputs", "demo")
    os.makedirs(out_dir, exist_ok=True)
    logging.basicConfig(level=logging.ERROR)
    out = os.path.join(out_dir, "ingest_datalist.json")
    report = ingest(samples, out, gsps=True, split=(0.6, 0.2, 0.2))
    print(report.summary())
    print(f"datalist:          {out}")
    print(f"quarantine report: {os.path.splitext(out)[0]}_quarantine.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
