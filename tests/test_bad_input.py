"""Bad input: one clear `error:` line on stderr, exit code 2, and nothing written."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app
from tests_support import assert_one_line_error

runner = CliRunner()


def copy_model(tiny, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny.path, folder)
    return folder


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def edit_tensors(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def empty_folder(folder):
    shutil.rmtree(folder)
    folder.mkdir()


def truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def poison(value):
    def edit(state):
        state["model.layers.1.mlp.down_proj.weight"][3, 4] = value

    return edit


CASES = {
    "empty folder": (empty_folder, "empty folder"),
    "missing config": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "broken config": (lambda f: (f / "config.json").write_text('{"model_type": "llama",'), "broken JSON"),
    "unknown architecture": (lambda f: edit_config(f, model_type="t5"), "supported: gpt2, bert, opt, gpt_neox, llama"),
    "missing tensor": (lambda f: edit_tensors(f, lambda s: s.pop("model.layers.1.mlp.up_proj.weight")), "missing tensor model.layers.1.mlp.up_proj.weight"),
    "shape mismatch": (lambda f: edit_config(f, intermediate_size=64), "shape mismatch"),
    "NaN in weights": (lambda f: edit_tensors(f, poison(float("nan"))), "contains NaN or Inf"),
    "Inf in weights": (lambda f: edit_tensors(f, poison(float("inf"))), "contains NaN or Inf"),
    "truncated file": (truncate, "truncated: tensor"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no weights found"),
    "bad width in config": (lambda f: edit_config(f, hidden_size="32"), "'hidden_size' must be a positive integer"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint_gives_one_line_and_exit_2_and_writes_nothing(tiny_models, tmp_path, case):
    damage, expected = CASES[case]
    folder = copy_model(tiny_models["llama"], tmp_path)
    damage(folder)
    for command in (["inspect", str(folder)], ["graph", str(folder), "--layer", "1", "--out", str(tmp_path / "g.pt"), "--graphml", str(tmp_path / "g.graphml")]):
        assert_one_line_error(runner.invoke(app, command), expected)
    assert not (tmp_path / "g.pt").exists() and not (tmp_path / "g.graphml").exists()
    assert not list(tmp_path.glob(".g.*"))  # no temporary files left behind


def test_missing_path_names_the_bundled_checkpoints(tmp_path):
    assert_one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "nope")]), "bundled checkpoints: all-MiniLM-L6-v2, SmolLM2-135M-Instruct")


def test_unknown_file_type(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"\0" * 16)
    assert_one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "weights.npz")]), "unknown checkpoint file type")


def test_truncated_gguf(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    assert_one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "model.gguf")]), "not a readable GGUF file")


def test_layer_out_of_range_writes_nothing(tiny_models, tmp_path):
    out = tmp_path / "g.pt"
    result = runner.invoke(app, ["graph", str(tiny_models["bert"].path), "--layer", "2", "--out", str(out)])
    assert_one_line_error(result, "layer 2 out of range: the model has 2 layers")
    assert not out.exists()


def test_graphml_over_the_edge_limit_is_refused_before_anything_is_written(tiny_models, tmp_path):
    out, graphml = tmp_path / "g.pt", tmp_path / "g.graphml"
    result = runner.invoke(app, ["graph", str(tiny_models["bert"].path), "--out", str(out), "--graphml", str(graphml), "--max-edges", "100"])
    assert_one_line_error(result, "over the limit of 100")
    assert not out.exists() and not graphml.exists()


def test_failing_write_leaves_no_partial_file(tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "g.pt"

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    result = runner.invoke(app, ["graph", str(tiny_models["bert"].path), "--out", str(out)])
    assert_one_line_error(result, "No space left on device")
    assert list(tmp_path.iterdir()) == []
