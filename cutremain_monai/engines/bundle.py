"""Running a bundle from Python: its config files, a parser over them, a ``ConfigWorkflow`` run, and its network
with the weights of a checkpoint. The one place the CLI, the DICOM node and every study runner set these up.

What it adds to ``monai.bundle``: the bundle's own ``configs/`` folder resolved from the bundle path (each bundle
is self-contained), ``bundle_root`` / ``meta_file`` / ``logging_file`` set consistently, and a loader that takes
MONAI's ``{"model": ...}`` checkpoints and plain state dicts alike (DDP's ``module.`` prefix removed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from cutremain_monai.handlers.mlflow_registry import default_tracking_uri
from cutremain_monai.networks.ensemble import checkpoint_state

__all__ = ["bundle_configs", "bundle_files", "bundle_parser", "run_bundle", "bundle_workflow", "load_network",
           "with_study_store"]


def bundle_configs(bundle: str, names: Sequence[str]) -> list[str]:
    """The bundle's config files for ``names`` in MONAI's merge order, e.g. ``["train.yaml", "cpu.yaml",
    "evaluate.yaml"]`` -> ``<bundle>/configs/train.yaml``, ... (each bundle is self-contained)."""
    out = []
    for name in names:
        path = os.path.join(bundle, "configs", name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"config {name!r} is not in {bundle}/configs")
        out.append(path)
    return out


def bundle_files(bundle: str) -> dict:
    """``meta_file`` and ``logging_file`` of the bundle, for ``ConfigWorkflow``."""
    return {"meta_file": os.path.join(bundle, "configs", "metadata.json"),
            "logging_file": os.path.join(bundle, "configs", "logging.conf")}


def bundle_parser(bundle: str, configs: Sequence[str], **overrides) -> ConfigParser:
    """A ``monai.bundle.ConfigParser`` over ``configs`` of ``bundle`` with ``bundle_root`` and ``overrides`` set, for
    runners that take pieces of a bundle (its preprocessing, network, evaluation model) rather than running it."""
    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle, configs))
    parser.update({"bundle_root": bundle, **overrides})
    return parser


def bundle_workflow(bundle: str, configs: Sequence[str], workflow_type: str = "train", **overrides) -> ConfigWorkflow:
    """An initialised ``ConfigWorkflow`` over ``configs`` (file names in ``<bundle>/configs``) of ``bundle`` with
    ``bundle_root`` set to the bundle; the caller runs and finalises it."""
    settings = {"bundle_root": bundle, **overrides}
    wf = ConfigWorkflow(config_file=bundle_configs(bundle, configs), workflow_type=workflow_type, **bundle_files(bundle),
                        **settings)
    wf.initialize()
    return wf


def run_bundle(bundle: str, configs: Sequence[str], workflow_type: str = "train", **overrides) -> ConfigWorkflow:
    """Run ``configs`` of ``bundle`` through :func:`bundle_workflow` (initialise, run, finalise); returns the workflow."""
    wf = bundle_workflow(bundle, configs, workflow_type, **overrides)
    try:
        wf.run()
    finally:
        wf.finalize()
    return wf


def with_study_store(output_dir: str, overrides: dict) -> dict:
    """``overrides`` with ``tracking_uri`` defaulting to the one MLflow store of a study in ``output_dir``
    (``MLFLOW_TRACKING_URI`` when set, else a sqlite file there): every run of the study lands in one store (one
    MLflow UI), made once rather than once per run folder. A ``tracking_uri`` in ``overrides`` wins."""
    return {"tracking_uri": default_tracking_uri(output_dir), **overrides}


def load_network(parser: ConfigParser, checkpoint: str | None = None, device: str | torch.device | None = None,
                 key: str = "network_def") -> torch.nn.Module:
    """The bundle's network (``key`` of ``parser``) in eval mode, with the weights of ``checkpoint`` (a path; None:
    the parser's ``model_path``), on ``device`` (None: where it was built)."""
    model = parser.get_parsed_content(key, instantiate=True)
    model.load_state_dict(checkpoint_state(checkpoint if checkpoint is not None else parser.get_parsed_content("model_path")))
    if device is not None:
        model = model.to(device)
    return model.eval()
