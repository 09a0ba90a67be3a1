"""Metrics, the ordering of methods on real checkpoints, and the partition / eval / compare commands."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from metanet.checkpoints import open_checkpoint
from metanet.eval.compare import CompareSettings, aggregate, compare
from metanet.eval.metrics import layer_metrics
from metanet.partition import LayerPartition, OperatingPoint
from metanet.partition.methods import DATA_FREE_METHODS, METHODS

runner = CliRunner()


def test_all_experts_active_reproduce_the_dense_layer(minilm_path):
    layer = open_checkpoint(minilm_path).layer(2)
    x = torch.randn(300, layer.d_model, generator=torch.Generator().manual_seed(0))
    point = OperatingPoint(16, 16)
    lp = LayerPartition(torch.arange(layer.d_ff) % 16, torch.randn(16, layer.d_model), torch.zeros(16))
    metrics = layer_metrics(layer, lp, point, x, batch_tokens=128)
    assert metrics["rel_error"] < 1e-6 and metrics["oracle_rel_error"] < 1e-6
    assert metrics["mass_recall"] == pytest.approx(1.0) and metrics["active_fraction"] == pytest.approx(1.0)
    assert metrics["load_cv"] == 0.0 and metrics["expert_load"] == [300] * 16


def test_fewer_experts_lose_output_and_the_oracle_loses_least(minilm_path):
    layer = open_checkpoint(minilm_path).layer(2)
    x = torch.randn(300, layer.d_model, generator=torch.Generator().manual_seed(0))
    lp = LayerPartition(torch.arange(layer.d_ff) % 16, torch.randn(16, layer.d_model), torch.zeros(16))
    metrics = layer_metrics(layer, lp, OperatingPoint(16, 4), x)
    assert 0 < metrics["oracle_rel_error"] < metrics["rel_error"] < 2
    assert metrics["active_fraction"] == pytest.approx(4 * 96 * (2 * 384 + 1) / (2 * 384 * 1536 + 1536) + 384 / (2 * 384 * 1536 + 1536 + 384), rel=1e-2)


def ordering_rows(path, heldout_tokens=2048, calib_tokens=1024):
    settings = CompareSettings(
        methods=list(METHODS), point=OperatingPoint(16, 4), routers=["centroid", "scaled", "lsq"],  # mlp, cmoe: test_partition.py
        calib_tokens=calib_tokens, heldout_tokens=heldout_tokens, model_quality=False,
    )
    return aggregate(compare(open_checkpoint(path), settings))


def assert_sane_ordering(table):
    by = {(row["method"], row["router"]): row for row in table}
    assert {m for m, _ in by} == set(METHODS)
    for row in table:  # oracle routing beats every learned router on the same partition
        assert row["oracle_rel_error"] < row["rel_error"], row
        assert 0 < row["rel_error"] < 1.5 and 0 < row["router_recall"] <= 1
    for method in METHODS[1:]:  # every non-random method beats random, router for router and under the oracle
        for router in ("scaled", "lsq"):
            assert by[method, router]["rel_error"] < by["random", router]["rel_error"], (method, router)
        assert by[method, "lsq"]["oracle_rel_error"] < by["random", "lsq"]["oracle_rel_error"], method
    for method in DATA_FREE_METHODS:
        assert by[method, "centroid"]["calib_tokens"] == 0 and by[method, "lsq"]["calib_tokens"] > 0


def test_method_ordering_on_minilm(minilm_path):
    assert_sane_ordering(ordering_rows(minilm_path))


def test_method_ordering_on_a_trained_causal_lm(trained_lm):
    assert_sane_ordering(ordering_rows(trained_lm))


def test_partition_then_eval_commands(trained_lm, tmp_path):
    out = tmp_path / "part"
    result = runner.invoke(app, ["partition", str(trained_lm), "--method", "cmoe", "--experts", "16", "--active", "4", "--shared", "2",
                                 "--calib-tokens", "1024", "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "partition.json").read_text())
    assert (meta["method"], meta["router"], meta["experts"], meta["shared"], meta["expert_width"]) == ("cmoe", "cmoe", 16, 2, 16)
    assert meta["info"]["calib_tokens"] == 1024

    result = runner.invoke(app, ["eval", str(trained_lm), str(out), "--json", "--heldout-tokens", "1024"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("rel_error", "mass_recall", "router_recall", "load_cv", "active_fraction", "ppl_ratio"):
        assert isinstance(report[key], float), key
    assert report["ppl_ratio"] > 1 and len(report["layers"]) == 2 and report["heldout_tokens"] == 1024


def test_partition_calibrated_on_windows_the_model_writes_needs_no_text(trained_lm, tmp_path):
    out = tmp_path / "part"
    result = runner.invoke(app, ["partition", str(trained_lm), "--method", "coact", "--router", "lsq", "--calibration", "generated",
                                 "--corpus", str(tmp_path / "no-such-text"), "--calib-tokens", "1024", "--out", str(out)])
    assert result.exit_code == 0, result.output  # the corpus is never read
    info = json.loads((out / "partition.json").read_text())["info"]
    assert (info["calib_source"], info["calib_tokens"]) == ("generated", 1024)

    result = runner.invoke(app, ["partition", str(trained_lm), "--method", "coact", "--calibration", "web", "--out", str(tmp_path / "p2")])
    assert result.exit_code == 2 and "--calibration must be one of text, generated" in result.stderr
    assert not (tmp_path / "p2").exists()
    result = runner.invoke(app, ["compare", str(trained_lm), "--methods", "coact", "--calibration", "web", "--out", str(tmp_path / "c2")])
    assert result.exit_code == 2 and "--calibration must be one of text, generated" in result.stderr
    assert not (tmp_path / "c2").exists()


def test_compare_writes_tables_plots_and_an_mlflow_run(trained_lm, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(trained_lm), "--methods", "random,joint", "--seeds", "0,1", "--calib-tokens", "512",
                                 "--heldout-tokens", "512", "--out", str(out), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "compare.json").read_text())["table"]
    assert [(r["method"], r["router"], r["seeds"]) for r in table] == [("random", "centroid", 2), ("joint", "scaled", 2)]
    assert "| joint | scaled |" in (out / "compare.md").read_text()
    assert (out / "rel_error_by_layer.png").stat().st_size > 10_000 and (out / "expert_load.png").stat().st_size > 10_000
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("compare").experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["joint.scaled.rel_error"] == pytest.approx(table[1]["rel_error"])
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"compare.md", "expert_load.png"}


def one_line_error(args, expected):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr


def test_bad_operating_points_and_inputs(minilm_path, tiny_models, tmp_path):
    out = tmp_path / "p"
    base = ["partition", str(minilm_path), "--method", "kmeans", "--out", str(out)]
    one_line_error(base + ["--experts", "7"], "E=7 does not split d_ff=1536")
    one_line_error(base + ["--experts", "16", "--active", "17"], "active k=17 is more than experts E=16")
    one_line_error(base + ["--router", "oracle"], "oracle routing is an evaluation mode")
    one_line_error(["partition", str(minilm_path), "--method", "spectral", "--out", str(out)], "unknown partition method 'spectral'")
    (tmp_path / "empty").mkdir()
    one_line_error(["partition", str(minilm_path), "--method", "cmoe", "--corpus", str(tmp_path / "empty"), "--out", str(out)], "empty corpus")
    one_line_error(["partition", str(tiny_models["llama"].path), "--method", "coact", "--experts", "11", "--out", str(out)], "needs a tokenizer")
    assert not out.exists()


def test_partition_from_another_checkpoint_is_refused(trained_lm, tmp_path):
    from tests_support import retrained_copy

    part = tmp_path / "part"
    assert runner.invoke(app, ["partition", str(trained_lm), "--method", "kmeans", "--out", str(part)]).exit_code == 0
    other = retrained_copy(trained_lm, tmp_path / "other")
    one_line_error(["eval", str(other), str(part), "--heldout-tokens", "256"], "made for another checkpoint")
