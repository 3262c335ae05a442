"""MLflow model registry at the end of training (rank 0 only), next to MONAI's ``MLFlowHandler``.

MONAI's handler (inserted by ``monai.bundle run ... --tracking mlflow``) logs per-iteration and per-epoch values;
it does not log the hyperparameters we care about, the datalist hash, our plots, or register the model. This
handler does those at ``COMPLETED``: it reuses the run MONAI's handler opened during this training (the newest
run of the experiment started after this handler was attached), or opens its own when tracking is off. The best
checkpoint is loaded into the network, logged with ``mlflow.pytorch.log_model`` with a signature inferred from an
input example, explicit pip requirements (fast: no environment inference) and registered under ``model_name``.
Params are scalars of the config the user chose; nothing patient-related is logged (datalist: a hash only).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from cutremain_monai.handlers.utils import best_model, rank

__all__ = ["MLflowRegistry", "default_tracking_uri"]

logger = logging.getLogger(__name__)


# The user's setting, read once at import: mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into this process's
# environment, so reading it later would send every following run (k-fold CV) to the first run's store.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")
_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "MLFLOW_REGISTRY_URI")


def sqlite_artifact_location(tracking_uri: str) -> str | None:
    """``mlruns/`` beside a local SQLite store (as MONAI's ``MLFlowHandler`` chooses), else ``None`` (MLflow's
    choice). Without it MLflow puts the artifacts of a new experiment under ``./mlruns`` of whatever folder the run
    was started from."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    from pathlib import Path

    return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()


def default_tracking_uri(output_dir: str) -> str:
    """``MLFLOW_TRACKING_URI`` as the user set it (a server, or any store), else a sqlite file under ``output_dir``."""
    env = _USER_TRACKING_URI
    if env:
        return env
    os.makedirs(output_dir, exist_ok=True)
    return "sqlite:///" + os.path.abspath(os.path.join(output_dir, "mlruns.db"))


class MLflowRegistry:
    """Args:
        tracking_uri / experiment_name / run_name: where to log.
        model_name: registered model name (None: log the model without registering).
        network: the trained network (DDP-wrapped is fine); ``checkpoint``: best weights to load before logging.
        input_shape: shape of the input example (one sample, with batch axis; logged with a batch of 2 unless
            ``serialization_format`` is ``"pickle"``, so that ``torch.export`` keeps the batch axis dynamic).
        wrap: optional callable applied to the (best) network before logging, for networks with several inputs
            (e.g. :class:`cutremain_monai.networks.PackedSeverityViT`: one tensor in, so MLflow can sign it).
        serialization_format: MLflow's ``"pt2"`` (``torch.export``) or ``"pickle"``; None: MLflow's default. Models
            with data-dependent control flow (the zone pooling's empty-zone report) need ``"pickle"``.
        params: hyperparameters to log (scalars / short lists; nested dicts are flattened).
        artifacts: files, folders or glob patterns to log if they exist at the end (ROC PNG, CAM overlays, the
            resolved config that ``--tracking`` saves as ``config_*.json``).
        metrics_files: JSON files of final metrics to log as metrics.
        metrics: values to log as metrics at the end (e.g. how many items the datasets set aside).
        histories: objects with a ``history`` list of ``(metric, value, step)`` (the guided step's loss terms per
            iteration), logged with their steps at the end.
        enabled: switch (``False`` makes the handler a no-op).
    """

    def __init__(self, tracking_uri: str, experiment_name: str = "cutremain", run_name: str | None = None,
                 model_name: str | None = None, network: torch.nn.Module | None = None, checkpoint: str | None = None,
                 input_shape: Sequence[int] = (1, 1, 224, 224), params: Mapping | None = None,
                 artifacts: Sequence[str] = (), metrics_files: Sequence[str] = (), enabled: bool = True, wrap=None,
                 serialization_format: str | None = None, metrics: Mapping | None = None, histories: Sequence = ()):
        self.histories = [h for h in histories if h is not None]
        self.metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
        self.wrap = wrap
        self.serialization_format = serialization_format
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.model_name = model_name
        self.network = network
        self.checkpoint = checkpoint
        self.input_shape = tuple(int(v) for v in input_shape)
        self.params = dict(params or {})
        self.artifacts = list(artifacts)
        self.metrics_files = list(metrics_files)
        self.enabled = enabled
        self._t0 = 0.0
        self.registered_version: str | None = None
        self.run_id: str | None = None

    def attach(self, engine: Engine) -> None:
        self._t0 = time.time() * 1000 - 1000
        if self.enabled and not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def _flat_params(self) -> dict:
        out = {}
        def walk(prefix, value):
            if isinstance(value, Mapping):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = value if isinstance(value, (int, float, str, bool)) or value is None else str(list(value) if isinstance(value, (tuple, list)) else value)
        walk("", self.params)
        return {k: ("None" if v is None else v) for k, v in out.items()}

    def __call__(self, engine: Engine) -> None:
        if not self.enabled or rank() != 0:
            return
        saved = {k: os.environ.get(k) for k in _MLFLOW_ENV}
        try:
            self._log()
        finally:  # mlflow leaves its choices in os.environ; do not leak them into later runs or subprocesses
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _log(self) -> None:
        import json

        import mlflow
        from mlflow.models import infer_signature

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)  # the registry URI is cached per process otherwise
        client = mlflow.tracking.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        exp = client.get_experiment_by_name(self.experiment_name)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            self.experiment_name, artifact_location=sqlite_artifact_location(self.tracking_uri))
        runs = client.search_runs([exp_id], filter_string=f"attributes.start_time >= {int(self._t0)}",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        run_id = runs[0].info.run_id if runs else None
        with mlflow.start_run(run_id=run_id, experiment_id=exp_id, run_name=None if run_id else self.run_name):
            self.run_id = mlflow.active_run().info.run_id
            existing = set(mlflow.get_run(self.run_id).data.params)
            params = {k: v for k, v in self._flat_params().items() if k not in existing}
            if params:
                mlflow.log_params(params)
            if self.metrics:
                mlflow.log_metrics(self.metrics)
            self._log_histories(client)
            for path in self.metrics_files:
                if os.path.exists(path):
                    with open(path) as f:
                        values = json.load(f)
                    stem = os.path.splitext(os.path.basename(path))[0].replace("_metrics", "")
                    flat = dict(values)
                    for cls, per in (values.get("per_class") or {}).items():  # per-class metrics: final_val_<class>_auc
                        flat.update({f"{_metric_key(cls)}_{k}": v for k, v in per.items()})
                    mlflow.log_metrics({f"final_{stem}_{k}": float(v) for k, v in flat.items()
                                        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)})
            import glob

            paths = [p for pattern in self.artifacts for p in (sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern])]
            for path in paths:
                if os.path.isdir(path):
                    mlflow.log_artifacts(path, artifact_path=os.path.basename(os.path.normpath(path)))
                elif os.path.isfile(path):
                    mlflow.log_artifact(path)
            if self.network is not None:
                model = best_model(self.network, self.checkpoint).cpu()
                if self.wrap is not None:
                    model = self.wrap(model).eval()
                shape = self.input_shape
                if self.serialization_format != "pickle":  # pt2 (MLflow's default): torch.export makes a batch
                    shape = (max(2, shape[0]),) + shape[1:]  # of 1 static, so the model would take one image only
                example = torch.zeros(shape, dtype=torch.float32)
                with torch.no_grad():
                    out = model(example)
                signature = infer_signature(example.numpy(), out.numpy())
                import monai

                info = mlflow.pytorch.log_model(
                    model, name="model", signature=signature, input_example=example.numpy(),
                    registered_model_name=self.model_name,
                    **({"serialization_format": self.serialization_format} if self.serialization_format else {}),
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}"],
                )
                version = getattr(info, "registered_model_version", None)
                self.registered_version = str(version) if version is not None else None
        logger.info("MLflow run %s, registered model %s version %s", self.run_id, self.model_name, self.registered_version)


    def _log_histories(self, client) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(_metric_key(k), float(v), now, int(step)) for h in self.histories for k, v, step in getattr(h, "history", [])
                if np.isfinite(v)]
        for i in range(0, len(rows), 1000):  # MLflow's log_batch limit
            client.log_batch(self.run_id, metrics=rows[i : i + 1000])


def _metric_key(name: str) -> str:
    """MLflow metric names allow alphanumerics, ``_ - . /`` and spaces; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in str(name))
