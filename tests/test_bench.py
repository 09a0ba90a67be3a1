"""`metanet bench`: MoE vs dense speed of an applied checkpoint on real text, logged to MLflow."""

import json

import mlflow
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from metanet.checkpoints import open_checkpoint
from metanet.moe import apply
from metanet.partition import OperatingPoint
from metanet.partition.make import make_partition
from metanet.tracking import resolve_tracking_uri
from tests_support import assert_one_line_error

runner = CliRunner()


def applied(trained_lm, folder):
    checkpoint = open_checkpoint(trained_lm)
    apply(checkpoint, make_partition(checkpoint, "kmeans", OperatingPoint(16, 4)), folder)
    return folder


def bench_runs():
    client = mlflow.tracking.MlflowClient(resolve_tracking_uri())
    experiment = client.get_experiment_by_name("bench")
    return client, ([] if experiment is None else client.search_runs([experiment.experiment_id]))


def test_bench_times_every_layer_and_generation_against_the_dense_source_and_logs_the_run(trained_lm, tmp_path):
    moe_dir = applied(trained_lm, tmp_path / "moe")
    _, before = bench_runs()

    result = runner.invoke(app, ["bench", str(moe_dir), "--tokens", "1,4", "--new-tokens", "4", "--device", "cpu"])

    assert result.exit_code == 0, result.output
    assert "speed-up" in result.stdout and "grouped" in result.stdout and "CUDA-graph" not in result.stdout  # the CPU path
    client, runs = bench_runs()
    assert len(runs) == len(before) + 1
    run = runs[0]
    metrics = run.data.metrics
    for t in (1, 4):
        assert metrics[f"T{t}.dense_ms"] > 0 and metrics[f"T{t}.moe_ms"] > 0
        assert metrics[f"T{t}.speedup"] == metrics[f"T{t}.dense_ms"] / metrics[f"T{t}.moe_ms"]
        assert f"T{t}.graph_speedup" not in metrics
    assert metrics["moe_tokens_per_s"] > 0 and metrics["dense_tokens_per_s"] > 0
    assert metrics["steps_speedup"] == metrics["moe_steps_tokens_per_s"] / metrics["dense_steps_tokens_per_s"]  # llama: comparable
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"bench.json", "speedup.png"}
    report = json.loads(open(client.download_artifacts(run.info.run_id, "bench.json", str(tmp_path))).read())
    assert report["layers"] == 2 and report["end_to_end"]["dense_source"] == str(trained_lm)
    assert [row["paths"] for row in report["ffn"]] == [{"grouped": 2 * 8}] * 2  # every call of both layers, CPU path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bench_on_cuda_also_times_decode_calls_as_cuda_graph_replays(trained_lm, tmp_path):
    moe_dir = applied(trained_lm, tmp_path / "moe")

    result = runner.invoke(app, ["bench", str(moe_dir), "--tokens", "1,8,64", "--new-tokens", "4", "--device", "cuda"])

    assert result.exit_code == 0, result.output
    assert "CUDA-graph speed-up" in result.stdout
    _, runs = bench_runs()
    metrics = runs[0].data.metrics
    for t in (1, 8):  # decode: nothing synchronises, so the pass is captured
        assert metrics[f"T{t}.graph_speedup"] == metrics[f"T{t}.dense_graph_ms"] / metrics[f"T{t}.moe_graph_ms"]
    assert "T64.graph_speedup" not in metrics


def test_bench_without_the_dense_source_times_the_moe_alone(trained_lm, tmp_path):
    moe_dir = applied(trained_lm, tmp_path / "moe")
    config = json.loads((moe_dir / "config.json").read_text())
    config["moe"]["source"] = str(tmp_path / "moved-away")
    (moe_dir / "config.json").write_text(json.dumps(config))

    result = runner.invoke(app, ["bench", str(moe_dir), "--tokens", "2", "--new-tokens", "2"])

    assert result.exit_code == 0, result.output
    words = " ".join(result.stdout.replace("│", " ").split())  # the table may wrap the cell
    assert "not measured (dense source not found; pass --dense)" in words
    _, runs = bench_runs()
    assert "dense_tokens_per_s" not in runs[0].data.metrics and runs[0].data.metrics["moe_tokens_per_s"] > 0


def test_bench_refuses_bad_input_with_one_line_and_logs_nothing(trained_lm, tmp_path):
    moe_dir = applied(trained_lm, tmp_path / "moe")
    _, before = bench_runs()
    cases = [
        ([str(trained_lm)], "not an MoE checkpoint"),
        ([str(moe_dir), "--tokens", "1,x"], "--tokens takes comma-separated integers"),
        ([str(moe_dir), "--tokens", "0,8"], "token counts must be positive integers, got [0, 8]"),
        ([str(moe_dir), "--dtype", "int8"], "--dtype must be one of bf16, fp16, fp32"),
        ([str(moe_dir), "--device", "tpu"], "device must be auto, cpu or cuda"),
        ([str(moe_dir), "--dense", str(tmp_path / "no-such-model")], "no such file or folder"),
    ]
    if not torch.cuda.is_available():
        cases.append(([str(moe_dir), "--device", "cuda"], "no CUDA device is visible here"))
    for args, expected in cases:
        assert_one_line_error(runner.invoke(app, ["bench", *args]), expected)
    _, after = bench_runs()
    assert len(after) == len(before)


def test_bench_times_a_transformers_export_against_the_dense_source(trained_lm, tmp_path):
    """A GLM-4-MoE export: each block's transformers MoE module against the source's dense FFN, generation end to end."""
    from metanet.moe.export_transformers import export_transformers

    checkpoint = open_checkpoint(trained_lm)
    export_transformers(checkpoint, make_partition(checkpoint, "kmeans", OperatingPoint(16, 4)), tmp_path / "hf")

    result = runner.invoke(app, ["bench", str(tmp_path / "hf"), "--tokens", "1,4", "--new-tokens", "4", "--device", "cpu"])

    assert result.exit_code == 0, result.output
    assert "transformers" in result.stdout and "speed-up" in result.stdout
    client, runs = bench_runs()
    report = json.loads(open(client.download_artifacts(runs[0].info.run_id, "bench.json", str(tmp_path))).read())
    assert (report["format"], report["layers"], report["experts"], report["active"]) == ("transformers", 2, 16, [4, 4])
    assert [row["paths"] for row in report["ffn"]] == [{"transformers": 2 * 8}] * 2 and all(row["speedup"] > 0 for row in report["ffn"])
    assert report["end_to_end"]["dense_source"] == str(trained_lm) and report["end_to_end"]["speedup"] > 0

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["metanet_export"]["source"] = str(tmp_path / "moved-away")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    _, before = bench_runs()
    assert_one_line_error(runner.invoke(app, ["bench", str(tmp_path / "hf"), "--tokens", "2"]), "is not here; pass --dense CHECKPOINT")
    assert len(bench_runs()[1]) == len(before)
    result = runner.invoke(app, ["bench", str(tmp_path / "hf"), "--tokens", "2", "--new-tokens", "2", "--dense", str(trained_lm)])
    assert result.exit_code == 0, result.output
