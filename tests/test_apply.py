"""The MoE checkpoint: apply, load, padding, and refusal of corrupt or mismatched inputs."""

import copy
import errno
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app
from conftest import MODEL_TYPES
from metanet.calib import load_corpus, load_model_and_tokenizer, text_split
from metanet.checkpoints import open_checkpoint
from metanet.errors import MetanetError
from metanet.eval.evaluate import evaluate
from metanet.eval.model_quality import dense_reference
from metanet.moe import MoEFFN, apply, convert, load, moe_forward, select_experts
from metanet.moe import checkpoint as moe_checkpoint
from metanet.partition import OperatingPoint, Partition
from metanet.partition.make import make_partition

runner = CliRunner()
HELDOUT_TOKENS = 256


def moe_modules(model) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def tiny_partition(tiny, active: int | None = None, seed: int = 0) -> Partition:
    """Random partition of a tiny model into experts of width 8 (k = E unless `active`)."""
    experts = tiny.d_ff // 8
    return make_partition(open_checkpoint(tiny.path), "random", OperatingPoint(experts, active or experts, width_multiple=8), seed=seed)


def model_output(model, family: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state if family == "bert" else out.logits


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def one_line_error(args, expected):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr


# -- round trips: the loaded model measures what `eval` reported -------------------------------------
def heldout_report(checkpoint, partition):
    """(dense model, held-out split, evaluate's report) on HELDOUT_TOKENS held-out tokens."""
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    heldout = text_split(model, tokenizer, checkpoint.family.name, "heldout", HELDOUT_TOKENS, load_corpus())
    return model, heldout, evaluate(checkpoint, partition, heldout, model)


def assert_layers_match_the_report(loaded, checkpoint, partition, heldout, report):
    """Each loaded MoEFFN computes moe_forward under the partition's router, and its rel_error is eval's."""
    modules = moe_modules(loaded)
    assert [m.index for m in modules] == list(range(checkpoint.n_layers))
    for layer, module in zip(checkpoint.layers(), modules):
        x = heldout.ffn_inputs.layers[layer.index]  # [T, d]
        lp = partition.layers[layer.index]
        with torch.no_grad():
            y = module(x)
        expected = moe_forward(layer, lp.assign, select_experts(lp.scores(x), partition.point), x)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        dense = layer.forward(x)
        rel_error = ((dense - y).norm() / dense.norm()).item()
        assert rel_error == pytest.approx(report["layers"][layer.index]["rel_error"], abs=1e-5)


def test_minilm_round_trip_encodes_and_matches_eval(minilm_path, tmp_path):
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(minilm_path)
    part = make_partition(ckpt, "kmeans", OperatingPoint(16, 4))
    summary = apply(ckpt, part, tmp_path / "moe")
    loaded = load(tmp_path / "moe")

    assert (summary["expert_width"], summary["padded_width"], summary["dtype"]) == (96, 128, "float32")
    assert all(m.w_in.shape == (16, 128, 384) and m.w_out.shape == (16, 384, 128) for m in moe_modules(loaded))
    assert loaded.config.intermediate_size == 1536  # the real width, not the placeholder FFNs' it was built with
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "moe", local_files_only=True)  # copied with the weights
    with torch.no_grad():
        embedding = loaded(**tokenizer(["To be, or not to be"], return_tensors="pt")).last_hidden_state.mean(1)
    assert embedding.shape == (1, 384) and torch.isfinite(embedding).all()

    model, heldout, report = heldout_report(ckpt, part)
    cosine = torch.nn.functional.cosine_similarity(
        dense_reference(loaded, "bert", heldout.input_ids), dense_reference(model, "bert", heldout.input_ids), dim=1
    ).mean().item()
    assert cosine == pytest.approx(report["embedding_cosine"], abs=1e-5)
    assert_layers_match_the_report(loaded, ckpt, part, heldout, report)


def test_trained_lm_round_trip_generates_and_matches_eval(trained_lm, tmp_path):
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(trained_lm)
    part = make_partition(ckpt, "kmeans", OperatingPoint(16, 4))
    apply(ckpt, part, tmp_path / "moe")
    loaded = load(tmp_path / "moe")
    model, heldout, report = heldout_report(ckpt, part)

    nll = dense_reference(loaded, "llama", heldout.input_ids).mean().item()
    assert math.exp(nll - dense_reference(model, "llama", heldout.input_ids).mean().item()) == pytest.approx(report["ppl_ratio"], rel=1e-5)
    assert_layers_match_the_report(loaded, ckpt, part, heldout, report)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "moe", local_files_only=True)
    prompt = tokenizer("ROMEO:", return_tensors="pt").input_ids
    generated = loaded.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    converted = convert(copy.deepcopy(model), "llama", part).generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert generated.shape == (1, prompt.shape[1] + 12) and torch.equal(generated, converted)
    assert tokenizer.decode(generated[0]).startswith("ROMEO:")


# -- what the format promises ------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_expert_active_loads_as_the_dense_model(tiny_models, model_type, tmp_path):
    tiny = tiny_models[model_type]
    apply(open_checkpoint(tiny.path), tiny_partition(tiny), tmp_path / "moe")

    loaded = load(tmp_path / "moe")

    assert len(moe_modules(loaded)) == tiny.model.config.num_hidden_layers
    ids = token_ids()
    torch.testing.assert_close(model_output(loaded, tiny.family, ids), model_output(tiny.model, tiny.family, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])  # biased, and gated
def test_padding_changes_nothing(tiny_models, model_type, tmp_path):
    tiny = tiny_models[model_type]
    ckpt = open_checkpoint(tiny.path)
    part = tiny_partition(tiny, active=3, seed=1)
    apply(ckpt, part, tmp_path / "padded")
    apply(ckpt, part, tmp_path / "plain", pad_multiple=1)

    padded, plain = load(tmp_path / "padded"), load(tmp_path / "plain")

    ids = token_ids(2)
    torch.testing.assert_close(model_output(padded, tiny.family, ids), model_output(plain, tiny.family, ids), rtol=1e-6, atol=1e-6)
    for module, layer, lp in zip(moe_modules(padded), ckpt.layers(), part.layers):
        assert module.expert_width == 64 and (module.order == -1).sum() == part.point.experts * (64 - 8)
        pad = module.order.reshape(part.point.experts, 64) < 0  # [E, M]
        assert module.w_in[pad].abs().sum() == 0 and module.w_out.transpose(1, 2)[pad].abs().sum() == 0
        assert module.b_in is None or module.b_in[pad].abs().sum() == 0
        assert torch.equal(module.assign(), lp.assign)
        assert module.to_ffn_layer(original_order=True).fingerprint() == layer.fingerprint()  # the experts are the source layer, exactly


def test_files_names_and_moe_section(tiny_models, tmp_path):
    tiny = tiny_models["llama"]
    part = tiny_partition(tiny, active=3)
    apply(open_checkpoint(tiny.path), part, tmp_path / "moe", dtype=torch.bfloat16)

    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    moe = config.pop("moe")
    assert config == {**json.loads((tiny.path / "config.json").read_text()), "dtype": "bfloat16"}
    assert {k: moe[k] for k in ("format_version", "family", "experts", "active", "expert_width", "padded_width", "dtype", "router_dtype")} == {
        "format_version": 1, "family": "llama", "experts": 11, "active": 3, "expert_width": 8, "padded_width": 64,
        "dtype": "bfloat16", "router_dtype": "float32",
    }
    assert moe["fingerprints"] == part.fingerprints
    assert leftovers(tmp_path / "moe") == [
        "checksums.json", "config.json", "generation_config.json", "model.safetensors", "moe-layer-0000.safetensors", "moe-layer-0001.safetensors",
    ]
    experts = load_file(tmp_path / "moe" / "moe-layer-0001.safetensors")
    assert {name: (list(t.shape), t.dtype) for name, t in experts.items()} == {
        "moe.layers.1.w_in": ([11, 64, 32], torch.bfloat16), "moe.layers.1.w_gate": ([11, 64, 32], torch.bfloat16),
        "moe.layers.1.w_out": ([11, 32, 64], torch.bfloat16), "moe.layers.1.router.weight": ([11, 32], torch.float32),
        "moe.layers.1.router.bias": ([11], torch.float32), "moe.layers.1.order": ([704], torch.int64),
    }
    source = load_file(tiny.path / "model.safetensors")
    dense = load_file(tmp_path / "moe" / "model.safetensors")
    assert set(dense) == {name for name in source if ".mlp." not in name}
    assert all(torch.equal(dense[name], source[name].bfloat16()) for name in dense)


def test_bf16_apply_loads_and_generates(trained_lm, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    part_dir, out = tmp_path / "part", tmp_path / "moe"
    make_partition(open_checkpoint(trained_lm), "kmeans", OperatingPoint(16, 4)).save(part_dir)
    result = runner.invoke(app, ["apply", str(trained_lm), str(part_dir), "--out", str(out), "--dtype", "bf16", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "padded to 64" in result.stdout

    loaded = load(out)
    for module in moe_modules(loaded):
        assert module.w_in.dtype == module.w_gate.dtype == module.w_out.dtype == torch.bfloat16
        assert module.router_weight.dtype == torch.float32
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    prompt = torch.tensor([[1, 2, 3]])
    generated = loaded.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 9)
    assert load(out, dtype=torch.float32).model.embed_tokens.weight.dtype == torch.float32

    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("apply").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["method"] == "kmeans" and run.data.params["dtype"] == "bf16"
    assert run.data.metrics["padded_width"] == 64 and run.data.metrics["tensors"] > 0
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"partition.json", "config.json", "checksums.json"}


# -- corrupt or mismatched inputs ---------------------------------------------------------------
def test_partition_from_another_checkpoint_is_refused(tiny_models, tmp_path):
    from tests_support import retrained_copy

    tiny = tiny_models["llama"]
    tiny_partition(tiny, active=3).save(tmp_path / "part")
    other = retrained_copy(tiny.path, tmp_path / "other")
    out = tmp_path / "out"

    one_line_error(["apply", str(other), str(tmp_path / "part"), "--out", str(out)], "made for another checkpoint")
    one_line_error(["apply", str(tiny_models["gpt_neox"].path), str(tmp_path / "part"), "--out", str(out)], "the partition has 2 layers, the model 3")
    with pytest.raises(MetanetError, match="layer 0's weights differ"):
        apply(open_checkpoint(other), Partition.load(tmp_path / "part"), out)  # the library checks as it reads
    assert leftovers(tmp_path) == ["other", "part"]


def test_missing_tensors_in_the_source_are_refused(tiny_models, tmp_path):
    tiny = tiny_models["llama"]
    part = tiny_partition(tiny)
    for name, expected in (("model.norm.weight", "missing tensor model.norm.weight"), ("model.layers.1.mlp.up_proj.weight", "missing tensor")):
        broken = tmp_path / "broken"
        shutil.copytree(tiny.path, broken)
        state = load_file(broken / "model.safetensors")
        del state[name]
        save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(MetanetError, match=expected):
            apply(open_checkpoint(broken), part, tmp_path / "out")
        assert leftovers(tmp_path) == ["broken"]
        shutil.rmtree(broken)


def test_tampered_moe_checkpoint_is_refused_on_load(tiny_models, tmp_path):
    tiny = tiny_models["gpt2"]
    good = tmp_path / "good"
    apply(open_checkpoint(tiny.path), tiny_partition(tiny, active=3), good)

    def tampered(name: str):
        folder = tmp_path / name
        shutil.rmtree(folder, ignore_errors=True)
        return shutil.copytree(good, folder)

    folder = tampered("flipped")
    data = bytearray((folder / "moe-layer-0001.safetensors").read_bytes())
    data[-3] ^= 0x40  # one bit of the last tensor's data
    (folder / "moe-layer-0001.safetensors").write_bytes(bytes(data))
    with pytest.raises(MetanetError, match=r"checksum mismatch for tensor moe\.layers\.1\."):
        load(folder)

    folder = tampered("edited")
    state = load_file(folder / "model.safetensors")
    state["transformer.wte.weight"][0, 0] += 1
    save_file(state, folder / "model.safetensors")
    with pytest.raises(MetanetError, match="checksum mismatch for tensor transformer.wte.weight"):
        load(folder)

    folder = tampered("incomplete")
    (folder / "moe-layer-0000.safetensors").unlink()
    with pytest.raises(MetanetError, match="moe-layer-0000.safetensors: missing"):
        load(folder)

    folder = tampered("dense")
    config = json.loads((folder / "config.json").read_text())
    del config["moe"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MetanetError, match="not an MoE checkpoint"):
        load(folder)


def test_full_disk_leaves_nothing_behind(tiny_models, tmp_path, monkeypatch):
    tiny = tiny_models["opt"]
    part = tiny_partition(tiny, active=3)
    part.save(tmp_path / "part")
    writes = []

    def disk_fills_up(tensors, path, metadata=None):  # the dense file is written, the first expert file is not
        if writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(path)
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(moe_checkpoint, "save_file", disk_fills_up)
    out = tmp_path / "models" / "moe"
    with pytest.raises(MetanetError, match="cannot write MoE checkpoint .*moe: No space left on device") as error:
        apply(open_checkpoint(tiny.path), part, out)
    assert "\n" not in str(error.value) and writes
    assert leftovers(tmp_path / "models") == []  # neither the checkpoint nor its temporary folder

    writes.clear()
    one_line_error(["apply", str(tiny.path), str(tmp_path / "part"), "--out", str(out)], "No space left on device")
    assert leftovers(tmp_path / "models") == []


def test_destination_is_replaced_only_when_it_is_an_moe_checkpoint(tiny_models, tmp_path):
    tiny = tiny_models["gpt_neox"]
    ckpt = open_checkpoint(tiny.path)
    out = tmp_path / "moe"
    apply(ckpt, tiny_partition(tiny, active=3), out)
    apply(ckpt, tiny_partition(tiny, active=2), out)  # an earlier MoE checkpoint is replaced
    assert json.loads((out / "config.json").read_text())["moe"]["active"] == 2
    assert leftovers(tmp_path) == ["moe"]

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(MetanetError, match="exists and is not an MoE checkpoint"):
        apply(ckpt, tiny_partition(tiny), tmp_path / "notes")
    assert leftovers(tmp_path / "notes") == ["keep.txt"]
    with pytest.raises(MetanetError, match="holds the source checkpoint"):
        apply(ckpt, tiny_partition(tiny), tiny.path)
    one_line_error(["apply", str(tiny.path), str(tmp_path), "--out", str(out), "--dtype", "int8"], "--dtype must be one of bf16, fp16, fp32")
