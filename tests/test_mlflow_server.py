"""metanet against a real MLflow tracking server: `mlflow server` on loopback, sqlite backend,
artifacts proxied by the server; commands log over HTTP and their runs read back through REST; the
registered `metanet` pyfunc is served by `mlflow models serve` and answers a request."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()
BIN = Path(sys.executable).parent  # the venv's console scripts: mlflow, metanet
STARTUP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(URL, server folder) of a running `mlflow server`; the whole process group is stopped afterwards."""
    root = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{free_port()}"
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: uvicorn workers stop with it
    )
    try:
        _wait_until(lambda: _answers(f"{url}/health"), process, root / "server.log", f"mlflow server at {url}/health")
        yield url, root
    finally:
        _stop(process)
        log.close()


def _wait_until(ready, process: subprocess.Popen, log: Path, what: str) -> None:
    """Poll `ready()` until it holds; fail with the process's log if it exits or STARTUP_TIMEOUT_S pass."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not answer within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _answers(url: str) -> bool:
    """Whether a GET of `url` returns 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def partition_run(server, tmp_path_factory):
    """The `metanet partition` console script run with MLFLOW_TRACKING_URI pointing at the server; returns (partition folder, run)."""
    from mlflow import MlflowClient

    url, _ = server
    work = tmp_path_factory.mktemp("partition-over-http")
    env = os.environ | {"MLFLOW_TRACKING_URI": url}
    done = subprocess.run([str(BIN / "metanet"), "partition", "all-MiniLM-L6-v2", "--method", "random", "--out", "part"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("partition")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    return work / "part", run


def test_a_command_logs_params_metrics_and_artifacts_through_the_server(server, partition_run, tmp_path):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    url, root = server
    part, run = partition_run
    assert run.info.status == "FINISHED" and run.info.run_name == "random-centroid"
    assert {"checkpoint": "all-MiniLM-L6-v2", "method": "random", "router": "centroid", "experts": "16", "active": "4"}.items() <= run.data.params.items()
    assert run.data.metrics["calib_tokens"] == 0 and run.data.metrics["convert_s"] >= 0
    # artifacts go through the server (mlflow-artifacts:/…) into its --artifacts-destination, not into the client's folder
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [a.path for a in MlflowClient(tracking_uri=url).list_artifacts(run.info.run_id)] == ["partition.json"]
    local = download_artifacts(run_id=run.info.run_id, artifact_path="partition.json", dst_path=str(tmp_path), tracking_uri=url)
    assert json.loads(Path(local).read_text()) == json.loads((part / "partition.json").read_text())
    assert list(root.glob(f"artifacts/**/{run.info.run_id}/artifacts/partition.json"))
    assert not (part.parent / "mlruns").exists() and not (part.parent / "mlflow.db").exists()


def test_metanet_runs_lists_and_shows_the_run_from_the_server(server, partition_run):
    url, _ = server
    _, run = partition_run
    listed = runner.invoke(app, ["runs", "--json", "--tracking-uri", url])
    assert listed.exit_code == 0, listed.output
    (row,) = [r for r in json.loads(listed.stdout) if r["run_id"] == run.info.run_id]
    assert row["experiment"] == "partition" and row["status"] == "FINISHED" and "convert_s" in row["metrics"]

    shown = runner.invoke(app, ["runs", "show", run.info.run_id, "--tracking-uri", url])
    assert shown.exit_code == 0, shown.output
    for expected in ("all-MiniLM-L6-v2", "method", "random", "convert_s", "partition.json", "mlflow-artifacts:"):
        assert expected in shown.stdout, expected
    missing = runner.invoke(app, ["runs", "show", "f" * 32, "--tracking-uri", url])
    assert missing.exit_code == 2 and "no run" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_predict_logs_its_run_on_the_server(server, tiny_models, tmp_path):
    from mlflow import MlflowClient

    url, _ = server
    env = os.environ | {"MLFLOW_TRACKING_URI": url}
    done = subprocess.run([str(BIN / "metanet"), "predict", str(tiny_models["gpt2"].path), "-E", "4", "-k", "2", "--width-multiple", "1",
                           "--out", "part"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(tracking_uri=url)
    (run,) = client.search_runs([client.get_experiment_by_name("predict").experiment_id])
    assert run.data.params["method"] == "metanet" and run.data.params["model"] == "shipped"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["partition.json"]


def test_the_registered_model_serves_partitions_over_http(server, tiny_models, tmp_path):
    """Register the shipped metanetwork as `metanet` on the server, `mlflow models serve` it, send one request."""
    import mlflow

    from metanet.model.store import SHIPPED
    from metanet.partition import Partition
    from metanet.serving import log_pyfunc

    url, _ = server
    mlflow.set_tracking_uri(url)  # conftest points MLflow back at the session's store after the test
    mlflow.set_experiment("serving-test")
    with mlflow.start_run():
        log_pyfunc(SHIPPED, registered_name="metanet")
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/metanet/latest", "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=os.environ | {"MLFLOW_TRACKING_URI": url, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},  # it starts `uvicorn` from PATH
    )
    try:
        _wait_until(lambda: _answers(f"http://127.0.0.1:{port}/ping"), process, tmp_path / "serve.log", f"mlflow models serve on port {port}")
        out = tmp_path / "served-partition"
        request = {"dataframe_records": [{"checkpoint": str(tiny_models["gpt2"].path), "experts": 4, "active": 2, "out": str(out)}]}
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(request).encode(),
                                                           {"Content-Type": "application/json"}), timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        _stop(process)
        log.close()
    (row,) = answer["predictions"]
    assert row["partition"] == str(out) and row["method"] == "metanet"
    partition = Partition.load(out)
    assert partition.point.experts == 4 and len(partition.layers) == row["layers"]
