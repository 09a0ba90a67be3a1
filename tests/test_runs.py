"""`metanet runs` and `metanet runs show` against a local sqlite MLflow store."""

import json
import socket

import pytest
from typer.testing import CliRunner

from cli.main import app
from metanet.tracking import log_artifacts, log_metrics, tracked_run

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, partition run id, compare run id): a real `metanet partition` run, then a compare-like run."""
    root = tmp_path_factory.mktemp("runs-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the sqlite store keeps artifacts in ./mlruns
        uri = f"sqlite:///{root}/mlflow.db"
        result = runner.invoke(app, ["partition", "all-MiniLM-L6-v2", "--method", "random", "--out", str(root / "part"), "--tracking-uri", uri])
        assert result.exit_code == 0, result.output
        (root / "plots").mkdir()
        (root / "plots" / "curve.txt").write_text("not a picture")
        with tracked_run("compare", "E16-k4-s0", {"methods": "kmeans,random"}, uri) as run:
            log_metrics({"kmeans.centroid.rel_error": 0.5, "random.centroid.rel_error": 0.9, "steps": 3.0})
            log_artifacts(root / "plots")
    partition_run = json.loads(runner.invoke(app, ["runs", "--experiment", "partition", "--json", "--tracking-uri", uri]).stdout)[0]["run_id"]
    return uri, partition_run, run.info.run_id


def listing(*args):
    result = runner.invoke(app, ["runs", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_runs_lists_newest_first_with_key_metrics(store):
    uri, partition_run, compare_run = store
    rows = json.loads(listing("--json", "--tracking-uri", uri))
    assert [(r["run_id"], r["experiment"], r["name"], r["status"]) for r in rows] == [
        (compare_run, "compare", "E16-k4-s0", "FINISHED"), (partition_run, "partition", "random-centroid", "FINISHED")]
    assert rows[0]["metrics"] == {"kmeans.centroid.rel_error": 0.5, "random.centroid.rel_error": 0.9}  # `steps` is not a key metric
    assert list(rows[1]["metrics"]) == ["convert_s"] and rows[0]["start_time"] >= rows[1]["start_time"]

    table = listing("--tracking-uri", uri)
    assert compare_run in table and partition_run in table and "random-centroid" in table
    assert "kmeans.centroid.rel_error=0.5" in table
    assert [r["run_id"] for r in json.loads(listing("--json", "--limit", "1", "--tracking-uri", uri))] == [compare_run]
    assert [r["run_id"] for r in json.loads(listing("-e", "partition", "--json", "--tracking-uri", uri))] == [partition_run]


def test_runs_reads_mlflow_tracking_uri_from_the_environment(store, monkeypatch):
    uri, partition_run, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert partition_run in listing()


def test_show_prints_params_metrics_and_artifacts(store):
    uri, partition_run, compare_run = store
    details = json.loads(listing("show", partition_run, "--json", "--tracking-uri", uri))
    assert details["experiment"] == "partition" and details["status"] == "FINISHED"
    assert {"method": "random", "router": "centroid", "experts": "16", "checkpoint": "all-MiniLM-L6-v2"}.items() <= details["params"].items()
    assert set(details["metrics"]) == {"convert_s", "calib_tokens"} and details["metrics"]["calib_tokens"] == 0
    assert details["artifacts"] == ["partition.json"]

    text = listing("show", partition_run, "--tracking-uri", uri)
    for expected in ("params", "method", "random", "metrics", "convert_s", "artifacts", "partition.json"):
        assert expected in text, expected
    # the group's --tracking-uri reaches `show`; artifacts in folders are listed by their full path
    nested = listing("--tracking-uri", uri, "show", compare_run)
    assert "plots/curve.txt" in nested and "kmeans.centroid.rel_error" in nested and "steps" in nested


def one_line_error(args, expected):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr


def test_unknown_run_experiment_store_or_server_is_one_line_and_exit_2(store, tmp_path):
    uri = store[0]
    one_line_error(["runs", "show", "0" * 32, "--tracking-uri", uri], f"no run '{'0' * 32}'")
    one_line_error(["runs", "show", "not-a-run", "--tracking-uri", uri], "no run 'not-a-run'")
    one_line_error(["runs", "--experiment", "trian", "--tracking-uri", uri], "no experiment named 'trian'")
    one_line_error(["runs", "--limit", "0", "--tracking-uri", uri], "--limit must be at least 1")
    with socket.socket() as sock:  # a loopback port nobody listens on: refused at once, not after MLflow's retries
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    one_line_error(["runs", "--tracking-uri", f"http://127.0.0.1:{port}"], f"no MLflow server answers at http://127.0.0.1:{port}")
    missing = tmp_path / "none.db"
    one_line_error(["runs", "--tracking-uri", f"sqlite:///{missing}"], "no MLflow store at")
    assert not missing.exists()  # listing never creates a store
