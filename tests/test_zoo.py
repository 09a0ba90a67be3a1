"""The model zoo: the tiny zoo builds, its members are ordinary checkpoints with sane caches and
teachers, re-running skips everything, a killed build completes, bad configs fail in one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from metanet.checkpoints import open_checkpoint
from metanet.partition import Partition
from training.member_cache import TEACHER_METHODS, TEACHER_POINTS, load_ffn_inputs, load_neuron_stats, load_teachers
from training.zoo import read_manifest
from training.zoo_config import FFN_MULTIPLE

runner = CliRunner()

CONFIGS = Path(__file__).parents[1] / "configs"
TINY = CONFIGS / "zoo-tiny.yaml"
TINY_MEMBERS = 12  # 3 architectures × 2 seeds × 2 checkpoints
ROW_KEYS = {"path", "family", "d_model", "d_ff", "n_layers", "steps", "train_loss", "heldout_loss", "unigram_loss", "split", "seconds", "teachers"}


def build(out: Path, *args: str):
    return runner.invoke(app, ["zoo", "build", "--config", str(TINY), "--out", str(out), *args])


def model_times(zoo: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in zoo.glob("members/*/model.safetensors")}


@pytest.fixture(scope="module")
def rows(tiny_zoo) -> list[dict]:
    return read_manifest(tiny_zoo)


def test_manifest_has_one_sane_row_per_member(tiny_zoo, rows):
    assert len(rows) == TINY_MEMBERS and len({r["path"] for r in rows}) == TINY_MEMBERS
    assert {r["family"] for r in rows} == {"gpt2", "opt", "llama"}
    assert {r["steps"] for r in rows} == {30, 90} and {r["split"] for r in rows} == {"train", "val"}
    for row in rows:
        assert ROW_KEYS <= set(row) and (tiny_zoo / row["path"] / "member.json").is_file()
        assert row["split"] == ("val" if row["seed"] == 1 else "train")
        assert row["d_ff"] % FFN_MULTIPLE == 0 and row["n_layers"] == 2 and row["seconds"] > 0
        assert 0 < row["train_loss"] < 7 and 0 < row["heldout_loss"] < 7  # below ln(512) = 6.24 plus slack: it learnt something
    for row in rows:
        if row["steps"] == 90:  # later checkpoints of a run predict held-out text better than earlier ones
            early = next(r for r in rows if r["run"] == row["run"] and r["steps"] == 30)
            assert row["heldout_loss"] < early["heldout_loss"]


def test_calibration_caches_have_every_layer_in_float16(tiny_zoo, rows):
    for row in rows:
        folder = tiny_zoo / row["path"]
        inputs, stats = load_ffn_inputs(folder), load_neuron_stats(folder)
        assert sorted(inputs) == sorted(stats) == list(range(row["n_layers"]))
        for i, x in inputs.items():
            assert x.dtype == torch.float16 and x.shape == (1024, row["d_model"]) and torch.isfinite(x).all()
            rate, mean_abs = stats[i]["activation_rate"], stats[i]["mean_abs"]
            assert rate.shape == mean_abs.shape == (row["d_ff"],)
            assert 0 <= rate.min() and rate.max() <= 1 and (mean_abs >= 0).all()


def test_teacher_partitions_load_match_their_member_and_have_measured_errors(tiny_zoo, rows):
    for row in rows:
        folder = tiny_zoo / row["path"]
        checkpoint = open_checkpoint(folder)
        teachers = load_teachers(folder)
        assert len(teachers) == len(TEACHER_METHODS) * len(TEACHER_POINTS) and set(row["teachers"]) == set(teachers)
        for name, facts in teachers.items():
            assert 0 < facts["rel_error"] < 1.5 and len(facts["layers"]) == row["n_layers"]
            partition = Partition.load(folder / facts["path"])
            assert (partition.method, partition.point.experts, partition.point.shared) == (facts["method"], 16, facts["shared"])
            for layer in checkpoint.layers():
                partition.check_matches(layer.index, layer.fingerprint())
                sizes = torch.bincount(partition.layers[layer.index].assign, minlength=16)
                assert (sizes == row["d_ff"] // 16).all()


def test_cached_teacher_error_is_what_metanet_eval_measures(tiny_zoo, rows):
    member = tiny_zoo / next(r["path"] for r in rows if r["family"] == "llama" and r["steps"] == 90)
    facts = load_teachers(member)["coact-E16-k4-s2"]
    result = runner.invoke(app, ["eval", str(member), str(member / facts["path"]), "--json", "--heldout-tokens", "1024"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rel_error"] == pytest.approx(facts["rel_error"], rel=1e-5)
    assert [layer["rel_error"] for layer in report["layers"]] == pytest.approx(facts["layers"], rel=1e-5)


def test_every_member_loads_through_inspect(tiny_zoo, rows):
    for row in rows:
        result = runner.invoke(app, ["inspect", str(tiny_zoo / row["path"]), "--json"])
        assert result.exit_code == 0, result.output
        facts = json.loads(result.stdout)
        assert (facts["family"], facts["d_model"], facts["d_ff"], facts["n_layers"]) == (row["family"], row["d_model"], row["d_ff"], row["n_layers"])


def test_each_member_is_an_mlflow_run_with_its_loss_curve(rows):
    import mlflow

    runs = mlflow.search_runs(experiment_names=["zoo"], output_format="list")
    by_name = {run.info.run_name: run for run in runs}
    assert {r["name"] for r in rows} <= set(by_name)
    member = next(r for r in rows if r["steps"] == 90)
    curve = mlflow.MlflowClient().get_metric_history(by_name[member["name"]].info.run_id, "loss")
    assert len(curve) > 10 and max(point.step for point in curve) == 90
    assert by_name[member["name"]].data.metrics["heldout_loss"] == pytest.approx(member["heldout_loss"])


def test_rerun_skips_every_finished_member(tiny_zoo, rows):
    before = model_times(tiny_zoo)
    result = build(tiny_zoo)
    assert result.exit_code == 0, result.output
    assert f"{TINY_MEMBERS} members (0 built, {TINY_MEMBERS} already there)" in result.stdout
    assert model_times(tiny_zoo) == before and read_manifest(tiny_zoo) == rows


def test_killed_build_completes_on_rerun_with_no_corrupt_member(tiny_zoo, rows, tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    lost = [r["path"] for r in rows if r["run"] == rows[0]["run"]]  # both members of the first run
    for path in lost:
        shutil.rmtree(zoo / path)
    kept = model_times(zoo)
    command = [sys.executable, "-c", "from cli.main import app; app()", "zoo", "build", "--config", str(TINY), "--out", str(zoo)]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any((tmp / "config.json").exists() for tmp in (zoo / "members").glob(".*.tmp")):  # mid-member: weights written, caches not yet
            assert process.poll() is None, f"the build ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no member was started within 60 s"
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert list((zoo / "members").glob(".*.tmp")), "the kill left no half-built member to clean up"

    result = build(zoo)
    assert result.exit_code == 0, result.output
    assert not list((zoo / "members").glob(".*.tmp"))
    assert [r["path"] for r in read_manifest(zoo)] == [r["path"] for r in rows]
    assert {name: t for name, t in model_times(zoo).items() if name in kept} == kept  # the others were not rebuilt
    for path in lost:
        assert len(load_teachers(zoo / path)) == 4 and open_checkpoint(zoo / path).n_layers == 2
        assert runner.invoke(app, ["inspect", str(zoo / path), "--json"]).exit_code == 0


@pytest.mark.parametrize(
    "config, message",
    [
        ("families: gpt2,mamba\n", "zoo config: families must be distinct names among gpt2, opt, llama, gpt_neox"),
        ("d-models: 100\n", "zoo config: d_models must be positive multiples of head_dim=32"),
        ("checkpoints: 90,30\n", "zoo config: checkpoints must be increasing positive step counts"),
        ("seeds: one,two\n", "--seeds takes comma-separated int values"),
        ("architectures: 9\n", "architectures=9 needs 3 distinct shapes per family"),
        ("colour: blue\n", "unknown option(s) colour"),
    ],
)
def test_bad_config_fails_with_one_line_and_writes_nothing(tmp_path, config, message):
    file = tmp_path / "zoo.yaml"
    file.write_text(TINY.read_text() + config)
    result = runner.invoke(app, ["zoo", "build", "--config", str(file), "--out", str(tmp_path / "zoo")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not (tmp_path / "zoo").exists()


@pytest.mark.parametrize(
    "args, message",
    [(["--lrs", "0.001"], "was built from another config than this one"), (["--vocab-size", "600"], "built with other data settings (vocab_size: 512 → 600)")],
)
def test_a_zoo_refuses_members_or_data_from_another_config(tiny_zoo, args, message):
    result = build(tiny_zoo, *args)
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_full_config_plans_a_diverse_zoo_of_at_least_48_members():
    result = runner.invoke(app, ["zoo", "build", "--config", str(CONFIGS / "zoo.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    members = [json.loads(line) for line in result.stdout.splitlines()]
    shapes = {(m["family"], m["d_model"], m["d_ff"], m["n_layers"]) for m in members}
    assert len(members) >= 48 and len({m["steps"] for m in members}) >= 2
    assert {m["family"] for m in members} >= {"gpt2", "opt", "llama"} and {m["split"] for m in members} == {"train", "val", "test"}
    assert all(64 <= d <= 256 and 2 <= n <= 6 and f % FFN_MULTIPLE == 0 and 2 <= f / d <= 4 for _, d, f, n in shapes)
    assert any(f & (f - 1) for _, _, f, _ in shapes) and any(d & (d - 1) for _, d, _, _ in shapes)  # not only powers of two
    assert len({n for *_, n in shapes}) >= 3 and len({d for _, d, _, _ in shapes}) >= 3 and len({m["lr"] for m in members}) >= 2


def test_building_one_split_builds_only_its_members_and_keeps_the_manifest_whole(tiny_zoo, rows, tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    lost = {split: next(r["path"] for r in rows if r["split"] == split) for split in ("train", "val")}
    for path in lost.values():
        shutil.rmtree(zoo / path)
    result = build(zoo, "--splits", "val")
    assert result.exit_code == 0, result.output
    assert f"{TINY_MEMBERS - 1} members (1 built, {TINY_MEMBERS // 2 - 1} already there)" in result.stdout
    assert (zoo / lost["val"] / "model.safetensors").is_file() and not (zoo / lost["train"]).exists()
    assert [r["path"] for r in read_manifest(zoo)] == [r["path"] for r in rows if r["path"] != lost["train"]]
    planned = runner.invoke(app, ["zoo", "build", "--config", str(TINY), "--dry-run", "--splits", "val"])
    assert {json.loads(line)["split"] for line in planned.stdout.splitlines()} == {"val"}


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_an_unknown_split_fails_with_one_line_and_writes_nothing(tmp_path, dry_run):
    result = build(tmp_path / "zoo", "--splits", "train,holdout", *dry_run)
    assert result.exit_code == 2 and result.stderr.strip() == "error: zoo config: splits must be among train, val, test, got train, holdout", result.output
    assert not (tmp_path / "zoo").exists() and not result.stdout
