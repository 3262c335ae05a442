"""MLflow against a real tracking server, as hospitals run it: ``mlflow server`` (sqlite backend, artifacts proxied
through the server with ``--serve-artifacts``) on 127.0.0.1, one short ``--tracking mlflow`` training of the
clavicle bundle against ``http://127.0.0.1:PORT``, then the run, its metrics and artifacts, and the registered model
read back over HTTP. Needs the full ``mlflow`` package (test extras), not only ``mlflow-skinny``."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from tests.bundles.conftest import BUNDLES, config_arg, tiny_datalist
from tests.conftest import ROOT

CPU = ["train.yaml", "cpu.yaml"]
_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the CLI, uvicorn/gunicorn and their workers), SIGKILL what lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + 15
        while time.time() < deadline:
            proc.poll()  # reap the CLI, else its zombie keeps the group alive
            if not _group_alive(proc.pid):
                break
            time.sleep(0.2)
        else:
            continue
        break
    proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """URL of an ``mlflow server`` on a free local port; stopped (with its workers) at the end of the module."""
    pytest.importorskip("mlflow.server.handlers", reason="the mlflow server needs the full `mlflow` package "
                                                         "(pip install -e .[test]); mlflow-skinny has no server")
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", "sqlite:///" + str(root / "mlflow.db"), "--serve-artifacts",
           "--artifacts-destination", str(root / "artifacts")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # tracking, artifacts and the registry are served as by default; only the background job runner (GenAI
    # scorers: 8 more processes) is off, which a 2-core CI machine notices
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log_path = root / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.time() > deadline:
                pytest.fail(f"mlflow server not healthy after 60 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"url": url, "root": root, "log": log_path}
    finally:
        _stop_group(proc)
        log.close()


@pytest.fixture
def restore_mlflow_uris():
    """The test sets mlflow's tracking / registry URIs (which mlflow also writes to os.environ); put both back."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in _MLFLOW_ENV}
    tracking, registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    yield mlflow
    mlflow.set_tracking_uri(tracking)
    registry_utils._registry_uri = registry
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.slow
def test_training_logs_and_registers_on_tracking_server(tmp_path, mlflow_server, restore_mlflow_uris):
    mlflow = restore_mlflow_uris
    url = mlflow_server["url"]
    bundle = os.path.join(BUNDLES, "clavicle_fracture")
    out = tmp_path / "out"
    data = tiny_datalist(tmp_path, "clavicle")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg(CPU), "--datalist", data,
           "--datalist_task", "null", "--output_dir", str(out), "--image_size", "[64,64]", "--network_depth", "10",
           "--epochs", "2", "--batch_size", "8", "--cam_images", "2", "--tracking", "mlflow", "--tracking_uri", url,
           "--experiment_name", "hospital_server"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # a fresh shell, not this process
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=bundle, timeout=600,
                          env=dict(clean, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + mlflow_server["log"].read_text()[-2000:]
    assert not (out / "mlruns.db").exists() and not (out / "mlruns").exists()  # everything went to the server

    client = mlflow.tracking.MlflowClient(tracking_uri=url, registry_uri=url)
    exp = client.get_experiment_by_name("hospital_server")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # the registry handler reused the run of MONAI's MLFlowHandler
    run = runs[0]
    run_id = run.info.run_id
    params = run.data.params
    assert params["augmentation"] == "cut_remain"
    assert len(params["datalist_hash"]) == 16
    assert params["epochs"] == "2"
    history = client.get_metric_history(run_id, "val_auc")
    assert [m.step for m in history] == [1, 2]  # one value per epoch
    assert "final_val_auc" in run.data.metrics

    # artifacts: uploaded through the server's proxy into --artifacts-destination
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"threshold.json", "cam_overlays"} <= names, names
    assert any(n.startswith("config_") and n.endswith(".json") for n in names), names
    assert [a.path for a in client.list_artifacts(run_id, "cam_overlays")]
    stored = {p.name for p in (mlflow_server["root"] / "artifacts").rglob("*")}
    assert "threshold.json" in stored
    threshold = json.loads(open(client.download_artifacts(run_id, "threshold.json", str(tmp_path))).read())
    assert threshold == json.load(open(out / "threshold.json"))

    # the registered version belongs to this run and predicts like the best checkpoint
    versions = client.search_model_versions("name='clavicle_fracture'")
    assert len(versions) == 1 and versions[0].run_id == run_id
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    model = mlflow.pytorch.load_model(f"models:/clavicle_fracture/{versions[0].version}")

    from cutremain_monai.networks import checkpoint_state, resnet

    reference = resnet(10, in_channels=1, num_classes=1, stem_stride=2)
    reference.load_state_dict(checkpoint_state(str(out / "checkpoints" / "model.pt")))
    reference.eval()
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), reference(x[:1]))
        torch.testing.assert_close(model(x), reference(x))  # a batch, as the signature's -1 batch axis promises
    pyfunc = mlflow.pyfunc.load_model(f"models:/clavicle_fracture/{versions[0].version}")  # `mlflow models serve`
    assert pyfunc.metadata.get_input_schema().inputs[0].shape == (-1, 1, 64, 64)
    torch.testing.assert_close(torch.as_tensor(pyfunc.predict(x.numpy())), reference(x).detach())

    text = json.dumps(params) + json.dumps(run.data.tags)
    assert "SYN-" not in text and "SYNTHETIC" not in text  # no patient identifiers
