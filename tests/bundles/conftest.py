"""Helpers to run the bundles for one short epoch on the synthetic samples through monai.bundle.ConfigWorkflow."""

import json
import logging
import os

import pytest

from tests.conftest import ROOT, SAMPLES, mlflow_db

BUNDLES = os.path.join(ROOT, "bundles")
TINY = {"image_size": [64, 64], "network_depth": 10, "epochs": 1, "batch_size": 8, "num_workers": 0, "cam_images": 2}
# covid_severity: the small transformer at 64 px (a multiple of 16), two epochs so the ensemble has two members
COVID_TINY = {"image_size": 64, "epochs": 2, "batch_size": 4, "num_workers": 0, "overlays": 2, "seg_image_size": 64,
              "seg_epochs": 1, "seg_batch_size": 4}
# background_learning: 64 px images, 12 px patches (the seed's ratio), 14 x 14 windows at stride 4
BG_TINY = {"image_size": 64, "patch_size": 12, "window_stride": 4, "backbone": "resnet10", "epochs": 2,
           "images_per_batch": 4, "num_workers": 0, "overlays": 2, "window_batch": 256}

# lesion_segmentation: 64 px, ResNet-10 encoder, a refresh of the pseudo-masks after each epoch
LS_TINY = {"image_size": [64, 64], "network_depth": 10, "decoder_channels": 16, "epochs": 2, "batch_size": 4,
           "num_workers": 0, "overlays": 2, "refresh_start": 1, "refresh_every": 1}


def tiny_datalist(tmp_path, task="clavicle", n=(6, 4, 4)) -> str:
    """A small datalist over dicom_samples/<task> with absolute paths (balanced where possible)."""
    with open(os.path.join(SAMPLES, "datalist.json")) as f:
        data = json.load(f)[task]
    out = {}
    for section, k in zip(("training", "validation", "test"), n):
        items = data[section]
        pos = [i for i in items if i["label"] not in (0, [0])]
        neg = [i for i in items if i["label"] in (0, [0])]
        chosen = (pos[: (k + 1) // 2] + neg[: k // 2]) if pos and neg else items[:k]
        for it in chosen:
            for key in ("image", "gsps", "lung_mask"):
                if key in it:
                    it[key] = os.path.join(SAMPLES, it[key])
        out[section] = chosen
    path = str(tmp_path / "datalist.json")
    with open(path, "w") as f:
        json.dump({**out, task: out}, f)  # readable with datalist_task null or = task
    return path


def config_arg(names) -> str:
    """The ``--config_file`` argument for ``names``, relative to the bundle's folder (run with ``cwd`` there, as the
    bundle docs write it)."""
    return "[" + ",".join(f"'configs/{n}'" for n in names) + "]"


def run_bundle(bundle: str, configs, tmp_path, tiny=None, workflow_type="train", root=None, **overrides):
    """One ``ConfigWorkflow`` run of ``configs`` of ``bundle`` (under ``root``, default the repository's bundles),
    outputs in ``tmp_path/out``; returns ``(workflow, run result)``."""
    from monai.bundle import ConfigWorkflow

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    from cutremain_monai.engines.bundle import bundle_configs, bundle_files

    path = os.path.join(root or BUNDLES, bundle)
    settings = {"bundle_root": path, "output_dir": str(tmp_path / "out"), "datalist_task": None,
                "tracking_uri": mlflow_db(tmp_path, "mlruns.db"), **(TINY if tiny is None else tiny)}
    settings.update(overrides)
    wf = ConfigWorkflow(config_file=bundle_configs(path, configs), workflow_type=workflow_type, **bundle_files(path),
                        **settings)
    wf.initialize()
    result = wf.run()
    wf.finalize()
    return wf, result


@pytest.fixture
def clavicle_data(tmp_path):
    return tiny_datalist(tmp_path, "clavicle")
