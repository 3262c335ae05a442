"""Where a bundle finds its data when the user names none: the repository's ``dicom_samples/``.

Bundles keep the data location as a config value (``dataset_dir``) so a bundle directory copied anywhere still
runs; its default is the synthetic samples of the checkout the package is installed from (``pip install -e .``),
found next to the package rather than next to the bundle.
"""

from __future__ import annotations

import os

__all__ = ["default_dataset_dir"]


def default_dataset_dir() -> str:
    """``<checkout>/dicom_samples`` when it exists beside the installed package; else a ``FileNotFoundError``
    that says to set ``dataset_dir`` (or ``datalist`` / ``input_dir``)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "dicom_samples")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no dicom_samples/ beside the installed package ({path}): set dataset_dir "
                                "(or datalist / input_dir) on the command line")
    return path
