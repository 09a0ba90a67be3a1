"""`apply --format transformers`: a Glm4MoeForCausalLM folder that plain transformers loads and that computes the carved MoE.

What is exact (k = E, dense blocks, shared and routed experts' weights) is checked to float32 rounding; the routing,
approximate by construction (metanet.moe.export_transformers docstring), is checked by what it costs: the experts it
chooses, the logits, the perplexity and greedy decoding next to metanet's own MoE model.
"""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from metanet.checkpoints import open_checkpoint
from metanet.moe import apply, load, select_experts
from metanet.moe.export_transformers import ARCHITECTURE, export_transformers
from metanet.partition import OperatingPoint, Partition
from metanet.partition.make import make_partition
from tests_support import plain_transformers

runner = CliRunner()

def logits_and_tokens(model, ids, new_tokens=8):
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return logits, model.generate(ids[:1], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def relative_errors(logits, reference) -> torch.Tensor:
    """Per position: max |Δlogit| / max |reference logit|."""
    return (logits - reference).abs().amax(-1) / reference.abs().amax(-1)


def token_ids(seed=0, vocab=64, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- exact parts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_every_expert_active_exports_the_dense_model(tiny_models, model_type, tmp_path):
    tiny = tiny_models[model_type]
    ckpt = open_checkpoint(tiny.path)
    experts = tiny.d_ff // 8
    summary = export_transformers(ckpt, make_partition(ckpt, "random", OperatingPoint(experts, experts)), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = token_ids()
    assert (summary["dense_blocks"], config["first_k_dense_replace"], config["model_type"]) == (2, 2, "glm4_moe")
    assert config["attention_bias"] is (model_type == "qwen2") and config["rope_parameters"]["partial_rotary_factor"] == 1.0
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, tiny.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_qwen3_keeps_its_head_norms_and_head_dim(tmp_path):
    """Qwen3's per-head q/k RMSNorms map to use_qk_norm, a head_dim other than hidden/heads is carried over."""
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    dense = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=24)).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(0.1 * torch.randn_like(p))
    dense.save_pretrained(tmp_path / "qwen3")
    ckpt = open_checkpoint(tmp_path / "qwen3")
    export_transformers(ckpt, make_partition(ckpt, "random", OperatingPoint(6, 6)), tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert exported.config.use_qk_norm and exported.config.head_dim == 24
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_plan_with_a_dense_first_block_and_shared_experts(tiny_models, tmp_path):
    """Block 0 runs every expert: written as a dense MLP, it is the source FFN to float32 rounding. Block 1 has 2 shared
    experts, always on and unweighted: exact; and 3 of 9 routed experts: the model is metanet's MoE to ~1e-4."""
    from transformers import AutoModelForCausalLM

    tiny = tiny_models["llama"]
    ckpt = open_checkpoint(tiny.path)
    part = make_partition(ckpt, "random", OperatingPoint(11, 5, 2), seed=3)
    part.layers[0].point = OperatingPoint(11, 11)
    summary = export_transformers(ckpt, part, tmp_path / "hf")
    apply(ckpt, part, tmp_path / "moe")
    exported, reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), load(tmp_path / "moe")

    assert (summary["dense_blocks"], summary["experts"], summary["active"], summary["shared"]) == (1, 11, [11, 5], [0, 2])
    assert (summary["experts_per_token"], summary["routed_experts"]) == (3, 9)  # no padding: one sparse block
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(0))
    block, moe = exported.model.layers[1].mlp, reference.model.layers[1].mlp
    assert block.shared_experts.gate_proj.weight.shape == (16, 32) and block.experts.gate_up_proj.shape == (9, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported.model.layers[0].mlp(x), tiny.model.model.layers[0].mlp(x), rtol=1e-6, atol=1e-6)
        only_shared = torch.zeros(20, 11, dtype=torch.bool)
        only_shared[:, :2] = True
        torch.testing.assert_close(block.shared_experts(x), moe.forward_with_mask(x, only_shared), rtol=1e-6, atol=1e-6)
        ids = token_ids()
        errors = relative_errors(exported(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert errors.max() < 1e-3 and errors.median() < 3e-4, errors


# -- the carved MoE, in a fresh process ---------------------------------------------------------------
#: Per-block operating points of the trained LM's two blocks (E=16): one for both, with and without shared experts,
#: and a plan whose blocks differ in k and s (padded with zero experts: K = 6 routed per token, R = 16 + 6 − 4).
ROUND_TRIPS = {"k4": [(16, 4, 0)] * 2, "k4-shared2": [(16, 4, 2)] * 2, "plan": [(16, 4, 0), (16, 8, 2)]}


@pytest.mark.parametrize("points", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_fresh_process_loads_the_export_and_matches_metanets_moe(trained_lm, points, tmp_path):
    """The trained LM at 25% active (or a plan): plain transformers (no metanet import) loads the folder, computes
    metanet's MoE to ~1e-4 of the largest logit at most tokens, and greedy decoding gives the same tokens."""
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(trained_lm)
    part = make_partition(ckpt, "kmeans", OperatingPoint(*points[0]))
    for layer, point in zip(part.layers, points):
        layer.point = OperatingPoint(*point)
    apply(ckpt, part, tmp_path / "moe")
    summary = export_transformers(ckpt, part, tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)  # copied with the weights
    ids = tokenizer(["ROMEO: What light through yonder window breaks? It is the east, and Juliet is the sun."], return_tensors="pt").input_ids

    name, logits, generated = plain_transformers([tmp_path / "hf"], ids, tmp_path)[tmp_path / "hf"]
    reference, reference_tokens = logits_and_tokens(load(tmp_path / "moe"), ids)

    errors = relative_errors(logits, reference)
    assert name == ARCHITECTURE
    assert errors.median() < 3e-4 and errors.max() < 1e-2, errors
    assert torch.equal(generated, reference_tokens), (tokenizer.decode(generated[0]), tokenizer.decode(reference_tokens[0]))
    assert summary["active"] == [k for _, k, _ in points]
    assert summary["experts_per_token"] == max(k - s for _, k, s in points)
    assert summary["routed_experts"] == 16 + summary["experts_per_token"] - min(k for _, k, _ in points)


@pytest.mark.parametrize("biased", [False, True])
def test_exported_routers_choose_metanets_experts(trained_lm, biased, tmp_path):
    """On real FFN inputs of the trained LM, each exported block's gate chooses the experts metanet's router chooses
    for all but near-ties (scores closer than the float32 resolution of the sigmoid keys), with weights ≈ 1.
    `biased`: router biases of the size of the scores' spread, carried by e_score_correction_bias."""
    from transformers import AutoModelForCausalLM

    from metanet.calib import load_corpus, load_model_and_tokenizer, text_split

    ckpt = open_checkpoint(trained_lm)
    part = make_partition(ckpt, "kmeans", OperatingPoint(16, 6, 2))
    model, tokenizer = load_model_and_tokenizer(ckpt)
    heldout = text_split(model, tokenizer, "llama", "heldout", 1024, load_corpus())
    generator = torch.Generator().manual_seed(0)
    for i, lp in enumerate(part.layers):
        if biased:
            lp.router_bias = lp.scores(heldout.ffn_inputs.layers[i]).std() * torch.randn(16, generator=generator)
    export_transformers(ckpt, part, tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    for i, lp in enumerate(part.layers):
        x = heldout.ffn_inputs.layers[i]  # [T, d]
        expected = select_experts(lp.scores(x), part.point)[:, 2:]  # routed experts only
        with torch.no_grad():
            _, weights, chosen = exported.model.layers[i].mlp.gate(x)
        got = torch.zeros_like(expected).scatter_(1, chosen, True)
        agreement = (got == expected).all(dim=1).float().mean().item()
        assert agreement > 0.995, (i, agreement)
        assert (weights - 1).abs().max() < 5e-3  # ρ·σ(z)/Σσ ≈ 1 (ρ = k − s)
        if biased:  # the bias changes the choice: the exported gate follows it
            unbiased = select_experts(x @ lp.router_weight.T, part.point)[:, 2:]
            assert (unbiased != expected).any(dim=1).float().mean() > 0.1


def test_export_perplexity_equals_metanets(trained_lm, tmp_path):
    from metanet.calib import load_corpus, load_model_and_tokenizer, text_split
    from metanet.eval.model_quality import dense_reference
    from transformers import AutoModelForCausalLM

    ckpt = open_checkpoint(trained_lm)
    part = make_partition(ckpt, "kmeans", OperatingPoint(16, 4))
    apply(ckpt, part, tmp_path / "moe")
    export_transformers(ckpt, part, tmp_path / "hf")
    model, tokenizer = load_model_and_tokenizer(ckpt)
    heldout = text_split(model, tokenizer, "llama", "heldout", 1024, load_corpus())
    nll = {name: dense_reference(m, "llama", heldout.input_ids).mean().item()
           for name, m in {"dense": model, "metanet": load(tmp_path / "moe"), "export": AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()}.items()}
    ppl_metanet, ppl_export = math.exp(nll["metanet"] - nll["dense"]), math.exp(nll["export"] - nll["dense"])
    assert ppl_metanet > 1.05  # a real carve: 25% active costs perplexity
    assert ppl_export == pytest.approx(ppl_metanet, rel=2e-3)


def test_compensation_without_output_bias_exports_at_the_compensated_quality(trained_lm, tmp_path):
    """--no-output-bias refits each down projection alone: GLM-4-MoE holds it, the metanet format too, and both models
    measure the same perplexity (well below the uncompensated carve's)."""
    from transformers import AutoModelForCausalLM

    from metanet.calib import load_corpus, load_model_and_tokenizer, text_split
    from metanet.conversion.pipeline import ConversionSettings, convert_checkpoint
    from metanet.eval.model_quality import dense_reference

    ckpt = open_checkpoint(trained_lm)
    model, tokenizer = load_model_and_tokenizer(ckpt)
    settings = ConversionSettings(method="kmeans", router="lsq", point=OperatingPoint(16, 4), calibration="text", calib_tokens=1024,
                                  sequential=False, refine=False, compensate=True, output_bias=False)
    part = convert_checkpoint(ckpt, settings, model, tokenizer, load_corpus())
    assert part.compensated and all(lp.b_out is None for lp in part.layers) and part.info["output_bias"] is False
    apply(ckpt, part, tmp_path / "moe")
    export_transformers(ckpt, part, tmp_path / "hf")
    heldout = text_split(model, tokenizer, "llama", "heldout", 1024, load_corpus())
    nll = {name: dense_reference(m, "llama", heldout.input_ids).mean().item()
           for name, m in {"dense": model, "metanet": load(tmp_path / "moe"), "export": AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()}.items()}
    ppl_metanet, ppl_export = math.exp(nll["metanet"] - nll["dense"]), math.exp(nll["export"] - nll["dense"])
    assert ppl_export == pytest.approx(ppl_metanet, rel=2e-3)
    assert ppl_metanet < 1.3  # uncompensated, this carve measures ~1.5 (README)

    result = runner.invoke(app, ["partition", str(trained_lm), "--method", "kmeans", "--router", "lsq", "-E", "16", "-k", "4", "--compensate",
                                 "--no-output-bias", "--calib-tokens", "512", "--out", str(tmp_path / "part")])
    assert result.exit_code == 0, result.output
    stored = Partition.load(tmp_path / "part")
    assert stored.compensated and all(lp.b_out is None for lp in stored.layers)


def test_convert_writes_the_export_and_prints_its_own_perplexity(trained_lm, tmp_path):
    """convert --format transformers compensates without an output bias by default, writes the GLM-4-MoE folder and
    reports the perplexity of that folder as plain transformers runs it."""
    import re

    from transformers import AutoModelForCausalLM

    from metanet.calib import load_corpus, load_model_and_tokenizer, split_documents, tokenize_documents

    args = ["convert", str(trained_lm), "--out", str(tmp_path / "hf"), "--format", "transformers", "-E", "16", "--active-fraction", "0.25",
            "--method", "kmeans", "--router", "lsq", "--no-sequential", "--no-refine", "--calib-tokens", "512", "--heldout-tokens", "512",
            "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = float(re.search(r"ppl_ratio\s*│\s*1\s*│\s*([0-9.]+)", result.stdout).group(1))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["num_experts_per_tok"] == 4

    model, tokenizer = load_model_and_tokenizer(open_checkpoint(trained_lm))
    ids = tokenize_documents(tokenizer, split_documents(load_corpus())[1], 512)  # the held-out windows convert measures on
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()

    def nll(m):
        with torch.no_grad():
            logits = m(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()

    assert printed == pytest.approx(math.exp(nll(exported) - nll(model)), rel=2e-3) and printed < 1.4  # compensated (~1.1)

    one_line_error([*args[:-6], "--output-bias", "--device", "cpu"], "cannot hold compensation's output bias")
    assert leftovers(tmp_path) == ["hf"]


# -- refusals: one line, exit 2, nothing written -----------------------------------------------------
def one_line_error(args, expected):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr


@pytest.mark.parametrize("model_type, expected", [
    ("bert", "is an encoder"), ("gpt2", "non-gated gpt2 FFN"), ("gpt_neox", "non-gated gpt_neox FFN"),
    ("mistral", "sliding-window attention (window 4096 < 131072 positions)"),
])
def test_cli_refuses_what_has_no_transformers_moe_class(tiny_models, model_type, expected, tmp_path):
    tiny = tiny_models[model_type]
    make_partition(open_checkpoint(tiny.path), "random", OperatingPoint(tiny.d_ff // 8, 2)).save(tmp_path / "part")
    one_line_error(["apply", str(tiny.path), str(tmp_path / "part"), "--out", str(tmp_path / "hf"), "--format", "transformers"], expected)
    assert leftovers(tmp_path) == ["part"]


def test_cli_refuses_a_foreign_partition_and_what_glm4_moe_cannot_express(tiny_models, tmp_path):
    llama, mistral = tiny_models["llama"], tiny_models["mistral"]
    ckpt = open_checkpoint(llama.path)
    make_partition(open_checkpoint(mistral.path), "random", OperatingPoint(7, 2)).save(tmp_path / "foreign")
    one_line_error(["apply", str(llama.path), str(tmp_path / "foreign"), "--out", str(tmp_path / "hf"), "--format", "transformers"], "another checkpoint")

    compensated = make_partition(ckpt, "random", OperatingPoint(11, 3))
    compensated.layers[0].w_out = torch.randn(32, 88)
    compensated.layers[0].b_out = torch.randn(32)
    compensated.save(tmp_path / "compensated")
    one_line_error(["apply", str(llama.path), str(tmp_path / "compensated"), "--out", str(tmp_path / "hf"), "--format", "transformers"],
                   "output bias b_out")
    one_line_error(["apply", str(llama.path), str(tmp_path / "compensated"), "--out", str(tmp_path / "hf"), "--format", "gguf"], "--format must be one of")
    assert leftovers(tmp_path) == ["compensated", "foreign"]


def test_a_dense_block_after_a_sparse_one_runs_every_expert_weighted_1(tiny_models, tmp_path):
    """Block 1 runs all 11 experts after a sparse block 0 (k=3), so every block chooses K = 11 routed experts. Block 1's
    gate chooses its 11 experts and weights each exactly 1: it is the source FFN to float32 rounding. Block 0 chooses its
    3 experts and the 8 zero experts that pad it to 11, for every token: it is metanet's block to ~1e-3."""
    from transformers import AutoModelForCausalLM

    tiny = tiny_models["llama"]
    ckpt = open_checkpoint(tiny.path)
    plan = make_partition(ckpt, "random", OperatingPoint(11, 3), seed=1)
    plan.layers[1].point = OperatingPoint(11, 11)
    summary = export_transformers(ckpt, plan, tmp_path / "hf")
    apply(ckpt, plan, tmp_path / "moe")
    exported, reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), load(tmp_path / "moe")

    assert (summary["dense_blocks"], summary["experts_per_token"], summary["routed_experts"]) == (0, 11, 19)
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported.model.layers[1].mlp(x), tiny.model.model.layers[1].mlp(x), rtol=1e-5, atol=1e-6)
        _, weights, chosen = exported.model.layers[0].mlp.gate(x)
        assert (chosen >= 11).sum(dim=1).tolist() == [8] * 20  # every zero expert of block 0's padding, for every token
        errors = relative_errors(exported.model.layers[0].mlp(x), reference.model.layers[0].mlp(x))
    assert (weights - 1).abs().max() < 5e-3 and errors.max() < 5e-3, errors


def test_cli_writes_the_folder_and_replaces_an_earlier_export(tiny_models, tmp_path):
    tiny = tiny_models["qwen2"]
    make_partition(open_checkpoint(tiny.path), "random", OperatingPoint(6, 3, 1)).save(tmp_path / "part")
    args = ["apply", str(tiny.path), str(tmp_path / "part"), "--out", str(tmp_path / "hf"), "--format", "transformers", "--dtype", "bf16"]
    for _ in range(2):  # the second run replaces the first
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    files = leftovers(tmp_path / "hf")
    assert "config.json" in files and "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) == 3
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["n_routed_experts"], config["num_experts_per_tok"], config["n_shared_experts"], config["routed_scaling_factor"]) == (5, 2, 1, 2.0)
    assert config["dtype"] == "bfloat16" and leftovers(tmp_path) == ["hf", "part"]

    plan = Partition.load(tmp_path / "part")
    plan.layers[1].point = OperatingPoint(6, 5, 1)
    plan.save(tmp_path / "plan")
    result = runner.invoke(app, ["apply", str(tiny.path), str(tmp_path / "plan"), "--out", str(tmp_path / "hf"), "--format", "transformers"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["n_routed_experts"], config["num_experts_per_tok"], config["metanet_export"]["active"]) == (7, 4, [3, 5])
    assert "3–5 by block" in result.output

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    one_line_error([*args[:4], str(tmp_path / "other"), *args[5:]], "neither an MoE checkpoint nor a transformers export")
    assert leftovers(tmp_path / "other") == ["notes.txt"] and leftovers(tmp_path) == ["hf", "other", "part", "plan"]


# -- metanet export: an MoE checkpoint, healed or not --------------------------------------------------
def test_a_healed_plan_exports_and_plain_transformers_computes_it(trained_lm, tmp_path):
    """apply a per-block plan (k = 4 with no shared expert, then k = 8 with 2), heal it for a few hundred tokens (every
    expert and router moves), `metanet export` the healed folder: plain transformers in a fresh process computes the
    healed MoE (metanet.moe.load) to ~1e-4 at most tokens (random ids meet a near-tie now and then), greedy decoding
    gives the same tokens, and the stored experts' padding (16 real neurons of 64 each) is left out."""
    from metanet.heal import HealSettings, heal

    ckpt = open_checkpoint(trained_lm)
    part = make_partition(ckpt, "kmeans", OperatingPoint(16, 4))
    part.layers[1].point = OperatingPoint(16, 8, 2)
    apply(ckpt, part, tmp_path / "moe")
    settings = HealSettings(tokens=512, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1, eval_tokens=256, eval_every=512, checkpoint_every=4)
    heal(tmp_path / "moe", trained_lm, tmp_path / "healed", settings, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = runner.invoke(app, ["export", str(tmp_path / "healed"), "--out", str(tmp_path / "hf"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 0, result.output

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["moe_intermediate_size"], config["n_shared_experts"], config["num_experts_per_tok"], config["n_routed_experts"]) == (16, 2, 6, 18)
    assert config["metanet_export"]["moe_checkpoint"] == "healed" and config["metanet_export"]["active"] == [4, 8]
    ids = token_ids(vocab=config["vocab_size"], shape=(2, 24))
    name, logits, generated = plain_transformers([tmp_path / "hf"], ids, tmp_path)[tmp_path / "hf"]
    healed, source = load(tmp_path / "healed"), load(tmp_path / "moe")
    reference, reference_tokens = logits_and_tokens(healed, ids)
    errors = relative_errors(logits, reference)
    assert name == ARCHITECTURE and errors.median() < 3e-4 and (errors < 3e-3).float().mean() > 0.9 and errors.max() < 0.2, errors  # max: a swapped near-tie
    assert torch.equal(generated, reference_tokens)
    assert relative_errors(logits_and_tokens(source, ids)[0], reference).median() > 1e-2  # healing moved the model: the export is the healed one


def test_export_refuses_what_glm4_moe_cannot_hold_and_writes_nothing(tiny_models, trained_lm, tmp_path):
    bert = open_checkpoint(tiny_models["bert"].path)
    apply(bert, make_partition(bert, "random", OperatingPoint(10, 2)), tmp_path / "bert-moe")
    one_line_error(["export", str(tmp_path / "bert-moe"), "--out", str(tmp_path / "hf")], "is an encoder: no transformers MoE class matches it")

    llama = open_checkpoint(trained_lm)
    compensated = make_partition(llama, "kmeans", OperatingPoint(16, 4))
    for i, layer in enumerate(compensated.layers):
        layer.w_out, layer.b_out = llama.layer(i).w_out.clone(), torch.full((llama.d_model,), 0.01)
    apply(llama, compensated, tmp_path / "compensated")
    one_line_error(["export", str(tmp_path / "compensated"), "--out", str(tmp_path / "hf")], "holds compensation's output bias b_out")
    apply(llama, make_partition(llama, "kmeans", OperatingPoint(16, 4)), tmp_path / "moe")
    one_line_error(["export", str(tmp_path / "moe"), "--out", str(tmp_path / "moe")], "holds the source checkpoint")
    one_line_error(["export", str(tmp_path / "moe"), "--out", str(tmp_path / "bert-moe" / "..")], "holds the source checkpoint")
    one_line_error(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "hf")], "no such folder")
    one_line_error(["export", str(tmp_path / "moe"), "--out", str(tmp_path / "hf"), "--dtype", "int8"], "--dtype must be one of")
    assert leftovers(tmp_path) == ["bert-moe", "compensated", "moe"]
