"""Reading checkpoints: every family, every input format, against transformers' own modules."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.main import app
from conftest import MODEL_TYPES, build_tiny_model
from metanet.calib import load_model_and_tokenizer
from metanet.checkpoints import open_checkpoint
from metanet.errors import CheckpointError, MetanetError
from metanet.partition import Partition
from tests_support import assert_one_line_error

runner = CliRunner()


def inspect_json(path) -> dict:
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_inspect_minilm_lists_six_gelu_layers_of_384_by_1536():
    summary = inspect_json("all-MiniLM-L6-v2")
    assert summary["family"] == "bert"
    assert summary["layers"] == [{"index": i, "d_model": 384, "d_ff": 1536, "activation": "gelu", "gated": False} for i in range(6)]
    assert summary["parameters"]["ffn"] == 6 * (2 * 384 * 1536 + 1536 + 384)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_inspect_tiny_models_of_every_family(tiny_models, model_type):
    tiny = tiny_models[model_type]
    summary = inspect_json(tiny.path)
    n_layers = tiny.model.config.num_hidden_layers
    expected = {"d_model": tiny.d_model, "d_ff": tiny.d_ff, "activation": tiny.activation, "gated": tiny.gated}
    assert summary["family"] == tiny.family
    assert summary["layers"] == [{"index": i, **expected} for i in range(n_layers)]
    assert summary["parameters"]["total"] >= sum(p.numel() for p in tiny.model.parameters()) - tiny.model.config.vocab_size * tiny.d_model


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_ffn_layer_computes_what_the_transformers_module_computes(tiny_models, model_type):
    tiny = tiny_models[model_type]
    ckpt = open_checkpoint(tiny.path)
    torch.manual_seed(1)
    for i, layer in enumerate(ckpt.layers()):
        mlp, norm_module = tiny.mlp_and_norm(i)
        h = torch.randn(5, 7, tiny.d_model)
        with torch.no_grad():
            x = norm_module(h)
            torch.testing.assert_close(layer.norm.forward(h), x, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.forward(x), mlp(x), rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_reads_like_the_single_file(tiny_models, tmp_path):
    tiny = tiny_models["llama"]
    tiny.model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    sharded, single = open_checkpoint(tmp_path), open_checkpoint(tiny.path)
    for a, b in zip(sharded.layers(), single.layers()):
        assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in b.tensors())


def test_single_safetensors_file_with_config_beside_it(tiny_models):
    tiny = tiny_models["opt"]
    ckpt = open_checkpoint(tiny.path / "model.safetensors")
    assert ckpt.n_layers == 2 and ckpt.d_ff == 96


def test_pickled_state_dict_loads_with_weights_only(tiny_models, tmp_path):
    tiny = tiny_models["gpt2"]
    (tmp_path / "config.json").write_text((tiny.path / "config.json").read_text())
    torch.save(load_file(tiny.path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    from_pickle, from_safetensors = open_checkpoint(tmp_path), open_checkpoint(tiny.path)
    assert from_pickle.source.format == "pytorch"
    a, b = from_pickle.layer(1), from_safetensors.layer(1)
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in b.tensors())


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_would_run_code_is_refused_and_never_runs(tiny_models, tmp_path):
    (tmp_path / "config.json").write_text((tiny_models["gpt2"].path / "config.json").read_text())
    marker = tmp_path / "code-ran"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"h.0.mlp.c_fc.weight": _RunsCode(marker)}, f, protocol=2)
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2
    assert "refused" in result.stderr
    assert not marker.exists()


def _write_gguf(path, arch: str, tensors: dict, metadata: dict, qtype=None):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        getattr(writer, f"add_{key}")(value)
    for name, tensor in tensors.items():
        array = tensor.numpy().astype(np.float32)
        if qtype is not None and array.ndim == 2 and array.shape[-1] % 32 == 0:  # Q8_0 blocks of 32
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_as_gguf(tiny, path, qtype=None):
    state = load_file(tiny.path / "model.safetensors")
    names = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    tensors = {}
    for i in range(2):
        for hf, gg in names.items():
            tensors[f"blk.{i}.{gg}.weight"] = state[f"model.layers.{i}.mlp.{hf}.weight"]
        tensors[f"blk.{i}.ffn_norm.weight"] = state[f"model.layers.{i}.post_attention_layernorm.weight"]
    metadata = {"block_count": 2, "embedding_length": tiny.d_model, "feed_forward_length": tiny.d_ff, "layer_norm_rms_eps": 1e-6}
    _write_gguf(path, "llama", tensors, metadata, qtype)


def test_gguf_float32_llama_reads_exactly(tiny_models, tmp_path):
    import gguf

    tiny = tiny_models["llama"]
    _llama_as_gguf(tiny, tmp_path / "tiny.gguf")
    summary = inspect_json(tmp_path / "tiny.gguf")
    assert (summary["format"], summary["family"], summary["n_layers"], summary["d_ff"], summary["gated"]) == ("gguf", "llama", 2, tiny.d_ff, True)
    a, b = open_checkpoint(tmp_path / "tiny.gguf").layer(1), open_checkpoint(tiny.path).layer(1)
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in b.tensors())

    _llama_as_gguf(tiny, tmp_path / "tiny-q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    q = open_checkpoint(tmp_path / "tiny-q8.gguf").layer(1)
    assert q.w_in.dtype == torch.float32
    rel = (q.w_in - b.w_in).norm() / b.w_in.norm()
    assert 0 < rel < 1e-2  # dequantised, not bit-equal


def test_gguf_partitions_like_its_folder_and_one_transformers_cannot_load_is_refused_by_what_runs_the_model(tiny_models, tmp_path):
    tiny = tiny_models["llama"]
    _llama_as_gguf(tiny, tmp_path / "tiny.gguf")
    for source, out in ((tmp_path / "tiny.gguf", tmp_path / "from-gguf"), (tiny.path, tmp_path / "from-folder")):
        result = runner.invoke(app, ["partition", str(source), "--method", "kmeans", "-E", "11", "-k", "3", "--out", str(out)])
        assert result.exit_code == 0, result.output
    from_gguf, from_folder = Partition.load(tmp_path / "from-gguf"), Partition.load(tmp_path / "from-folder")
    assert len(from_gguf.layers) == len(from_folder.layers) == 2  # the comparison below covers every layer
    assert all(torch.equal(a.assign, b.assign) and torch.equal(a.router_weight, b.router_weight) for a, b in zip(from_gguf.layers, from_folder.layers))
    # FFN tensors only, no tokenizer metadata: transformers cannot load it, so eval and apply refuse it in one line
    gguf, part, moe = str(tmp_path / "tiny.gguf"), str(tmp_path / "from-gguf"), tmp_path / "moe"
    for command in (["eval", gguf, part], ["apply", gguf, part, "--out", str(moe)]):
        assert_one_line_error(runner.invoke(app, command), "transformers cannot load this GGUF file (Cannot build a tokenizer")
    assert not moe.exists() and not list(tmp_path.glob(".moe.*"))


def test_a_gguf_whose_model_transformers_would_fill_with_random_weights_is_refused(tiny_models, tmp_path):
    tiny = tiny_models["llama"]
    tokenizer = {  # a byte-pair tokenizer in the file's metadata, so that loading gets as far as the model
        "tokenizer_model": "gpt2", "token_list": [f"t{i}" for i in range(64)], "token_types": [1] * 64, "token_merges": [],
        "token_scores": [0.0] * 64, "bos_token_id": 0, "eos_token_id": 1,
    }
    state = load_file(tiny.path / "model.safetensors")
    tensors = {f"blk.{i}.ffn_{gg}.weight": state[f"model.layers.{i}.mlp.{hf}_proj.weight"]
               for i in range(2) for hf, gg in (("gate", "gate"), ("up", "up"), ("down", "down"))}
    tensors |= {f"blk.{i}.ffn_norm.weight": state[f"model.layers.{i}.post_attention_layernorm.weight"] for i in range(2)}
    metadata = {"block_count": 2, "embedding_length": tiny.d_model, "feed_forward_length": tiny.d_ff, "layer_norm_rms_eps": 1e-6}
    _write_gguf(tmp_path / "ffn-only.gguf", "llama", tensors, metadata | tokenizer)
    with pytest.raises(MetanetError, match=r"transformers cannot load this GGUF file \(missing tensor lm_head.weight and \d+ more"):
        load_model_and_tokenizer(open_checkpoint(tmp_path / "ffn-only.gguf"))


def test_gguf_gpt2_conv1d_layout_is_restored(tiny_models, tmp_path):
    tiny = tiny_models["gpt2"]
    state = load_file(tiny.path / "model.safetensors")
    tensors = {}
    for i in range(2):  # GGUF stores Conv1D weights as [out, in]
        tensors[f"blk.{i}.ffn_up.weight"] = state[f"transformer.h.{i}.mlp.c_fc.weight"].T.contiguous()
        tensors[f"blk.{i}.ffn_up.bias"] = state[f"transformer.h.{i}.mlp.c_fc.bias"]
        tensors[f"blk.{i}.ffn_down.weight"] = state[f"transformer.h.{i}.mlp.c_proj.weight"].T.contiguous()
        tensors[f"blk.{i}.ffn_down.bias"] = state[f"transformer.h.{i}.mlp.c_proj.bias"]
        tensors[f"blk.{i}.ffn_norm.weight"] = state[f"transformer.h.{i}.ln_2.weight"]
        tensors[f"blk.{i}.ffn_norm.bias"] = state[f"transformer.h.{i}.ln_2.bias"]
    metadata = {"block_count": 2, "embedding_length": 32, "feed_forward_length": 128, "layer_norm_eps": 1e-5}
    _write_gguf(tmp_path / "gpt2.gguf", "gpt2", tensors, metadata)
    a, b = open_checkpoint(tmp_path / "gpt2.gguf").layer(0), open_checkpoint(tiny.path).layer(0)
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in b.tensors())


def test_layers_are_read_in_the_requested_dtype(tiny_models):
    layer = open_checkpoint(tiny_models["qwen2"].path).layer(0, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in layer.tensors().values())


def test_post_ln_opt_reads_the_attention_norm(tmp_path):
    import transformers as tf

    config = tf.OPTConfig(hidden_size=32, num_hidden_layers=1, ffn_dim=64, word_embed_proj_dim=32, num_attention_heads=2,
                          vocab_size=64, max_position_embeddings=64, do_layer_norm_before=False)
    tf.OPTForCausalLM(config).save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    assert "self_attn_layer_norm" in ckpt.tensor_names(0)["norm.weight"]


def test_checkpoint_error_names_layer_out_of_range(tiny_models):
    with pytest.raises(CheckpointError, match="layer 5 out of range"):
        open_checkpoint(tiny_models["bert"].path).layer(5)


def test_rebuilt_model_with_other_seed_differs(tmp_path):
    # guards the fixtures: two seeds must give different weights, else the exactness tests above prove little
    a = build_tiny_model("llama", tmp_path / "a", seed=1)
    b = build_tiny_model("llama", tmp_path / "b", seed=2)
    assert not torch.equal(open_checkpoint(a.path).layer(0).w_in, open_checkpoint(b.path).layer(0).w_in)
