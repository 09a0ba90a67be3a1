"""Export a carved MoE of a llama-family checkpoint as a transformers-native GLM-4-MoE folder.

`metanet apply --format transformers` writes this: a folder that loads with plain
`AutoModelForCausalLM.from_pretrained(folder)` (class `Glm4MoeForCausalLM`, model_type
`glm4_moe`; no trust_remote_code, no metanet import) and that the engines serving GLM-4.5
(vLLM, SGLang) can read, because the tensors use the hub's per-expert names.

Why GLM-4-MoE. With `attention_bias`, `use_qk_norm` and `partial_rotary_factor = 1` set from
the source, its attention, RMSNorms, rotary embedding (rotate-half, any rope type) and tied
embeddings are the llama family's, tensor name for tensor name (Qwen2's q/k/v biases:
attention_bias; Qwen3's per-head q/k norms: use_qk_norm). Its MoE block is

    y(x) = Σ_{e∈T(x)} w_e(x) · y_e(x) + shared(x)
    T(x) = top_{k_r} over routed e of  σ(x·Wg_e) + β_e            (β: e_score_correction_bias, selection only)
    w_e(x) = ρ · σ(x·Wg_e) / Σ_{j∈T(x)} σ(x·Wg_j)                  (norm_topk_prob, ρ: routed_scaling_factor)

with an ungated, always-on shared MLP and SwiGLU experts. metanet's carved block is
(metanet.moe.module)

    y(x) = Σ_{e<s} y_e(x) + Σ_{e∈S(x)} y_e(x),   S(x) = top_{k−s} over routed e of  x·W_r[e] + b_r[e]

and maps onto it as follows (E experts, s shared, k active, m = f/E):

    shared experts 0..s−1      → shared_experts.{gate,up,down}_proj, their neurons side by side (width s·m): exact
    routed expert e ≥ s        → experts.{e−s}.{gate,up,down}_proj (gate = w_in, up = w_gate, down = w_out): exact
    router weight W_r[e]       → gate.weight[e−s] = c · W_r[e]           (float32; c a power of two: exact)
    router bias b_r[e]         → gate.e_score_correction_bias[e−s] = c/4 · b_r[e]
    n_routed_experts, num_experts_per_tok, n_shared_experts, moe_intermediate_size = E−s, k−s, s, m
    routed_scaling_factor ρ    = k−s;  norm_topk_prob = true;  n_group = topk_group = 1

Since σ(z) = 1/2 + z/4 − z³/48 + …, the selection key is 1/2 + c/4·(x·W_r[e] + b_r[e]) + O(c³): the
order of metanet's scores; the weights are w_e = 1 + (z_e − mean_T z)/2 + O(z²) instead of 1, z = c·x·W_r[e].
Each block's c (`router_scale`) brings its score range R to about 2^ROUTER_RANGE_LOG2 = 2⁻¹⁰, which
trades the two float32 effects that remain: the weights' relative deviation (~2⁻¹¹) and the rounding of
the keys near 1/2 (spacing 2⁻²⁴), which can swap two experts whose scores differ by less than about
2⁻²⁴·4/c ≈ 2⁻¹²·R. The product of the two is fixed by float32 (the weight's variation and the key's
resolution come from the same σ), so no scale makes both vanish. Of the classes transformers ships with llama's
attention, none weights its chosen experts by exactly 1 while choosing them by a biased linear score; this is the
closest. (GraniteMoeShared, top-k on raw logits then a softmax over the chosen, would be exact in transformers under
a vanishing scale, but it has no router bias and vLLM takes the softmax before the top-k, where that scale ties
every expert.) Measured
on the trained test LM (README "Writing the MoE checkpoint"): median per-token logits error ~1e-4 of the
largest logit, a few tokens up to ~0.1 where a near-tie was swapped, perplexity equal to 0.1%.

Blocks that run every expert (k = E) are dense FFNs; GLM-4-MoE writes the first
`first_k_dense_replace` blocks as dense MLPs of width `intermediate_size` = f (exact).

Per-block plans. GLM-4-MoE has one n_routed_experts, num_experts_per_tok and n_shared_experts for every sparse
block, so a plan's blocks (one E, any k and s; `ExportLayout`) are padded to common sizes with zero experts, which
write nothing:

    S = max s_b     shared MLP of width S·m; a block with fewer shared experts gets zero neurons     exact
    K = max (k_b − s_b)   over the sparse blocks (a later block with k = E counts as sparse)
    block b: K − (k_b − s_b) zero experts that every token chooses (correction bias +1, gate rows 0: σ = 1/2),
             and zero experts no token chooses (bias −1), up to R = E + K − min_b k_b routed experts

The chosen zero experts carry σ(0) = 1/2, the value the real ones are scaled to carry, so the weights of the real
experts stay (k−s)·σ/Σσ ≈ 1 with ρ = K. A block where every expert runs writes its routed experts with gate rows 0
and bias +1: all chosen, all weighted exactly 1. The cost is compute, not quality: engines (and transformers' eager
loop) run K experts per token in every sparse block, so a plan exports at the cost of its largest k, and the files
hold the zero experts (R·m·3d weights per block).

What GLM-4-MoE cannot express is refused with a one-line MetanetError before anything is written: an output bias b_out of a
compensated partition (its MLPs have no biases; `--no-output-bias` compensates without one, at the same
perplexity on the trained test LM), families other than the gated llama family
(BERT, GPT-2, GPT-NeoX, OPT keep the metanet format), llama with attention_bias (o_proj bias)
and sliding-window attention.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from metanet.atomic import staged_folder
from metanet.checkpoints import Checkpoint
from metanet.errors import MetanetError
from metanet.checkpoints.families import family_for
from metanet.moe.checkpoint import (
    DenseParts, check_out_folder, dense_parts, dense_parts_of, is_moe_checkpoint, layer_points, read_config, read_layers,
)
from metanet.moe.module import MoEFFN
from metanet.partition.partition import OperatingPoint, Partition

log = logging.getLogger(__name__)

ARCHITECTURE = "Glm4MoeForCausalLM"
#: Each block's router is multiplied by the power of two c (exact in binary floating point) that brings its score
#: range R (see `router_scale`) to about 2^ROUTER_RANGE_LOG2: small enough that the sigmoid weights of the chosen
#: experts are nearly equal, large enough that float32 keeps most of their order (module docstring; measured best of
#: 2^-6 … 2^-14 on the trained test LM).
ROUTER_RANGE_LOG2 = -10
#: How much larger than the weights' score range R a router bias may be before it sets the scale (`router_scale`):
#: c/4·|b_r| then stays ≤ 2⁻¹²·2⁸ = 1/16, the keys within 1/2 ± 1/16, where float32's spacing is 2⁻²⁵ … 2⁻²⁴.
BIAS_HEADROOM = 2.0**8
#: Key of config.json naming what metanet exported (read by `check_destination` to allow replacing an export).
EXPORT_KEY = "metanet_export"
INDEX_FILE = "model.safetensors.index.json"


# -- what can be exported ---------------------------------------------------------------------
def check_exportable(checkpoint: Checkpoint, partition: Partition) -> "ExportLayout":
    """Raise a one-line MetanetError unless GLM-4-MoE can express `partition` of `checkpoint`; return its layout."""
    check_source(checkpoint.config, checkpoint.family.name, checkpoint.path.name)
    partition.check_layer_count(checkpoint.n_layers)
    if partition.compensated and any(lp.b_out is not None and bool(lp.b_out.any()) for lp in partition.layers):
        raise MetanetError(f"the partition is compensated with an output bias b_out, which {ARCHITECTURE}'s MLPs cannot hold; "
                           "convert (or partition) again with --no-output-bias, or use --format metanet")
    return check_points([partition.layer_point(i) for i in range(checkpoint.n_layers)])


def check_source(config: dict, family: str, name: str) -> None:
    """Raise a one-line MetanetError unless GLM-4-MoE has the attention, norms and FFN kind of the model whose
    transformers `config` and metanet `family` are given; `name` names it in the message."""
    model_type = config.get("model_type")
    if family != "llama":
        kind = "an encoder" if family == "bert" else f"a non-gated {family} FFN"
        raise MetanetError(f"--format transformers needs a gated llama-family decoder (llama, mistral, qwen2, qwen3); "
                           f"{name} is {kind}: no transformers MoE class matches it, use --format metanet")
    if model_type in ("llama", "qwen3") and config.get("attention_bias"):
        raise MetanetError(f"{name}: {model_type} with attention_bias=true has an o_proj bias that {ARCHITECTURE} lacks; use --format metanet")
    window = config.get("sliding_window") if model_type == "mistral" or config.get("use_sliding_window") else None
    if window is not None and window < config.get("max_position_embeddings", 0):
        raise MetanetError(f"{name}: sliding-window attention (window {window} < {config.get('max_position_embeddings')} positions) "
                           f"is not in {ARCHITECTURE}; use --format metanet")


@dataclass(frozen=True)
class ExportLayout:
    """GLM-4-MoE's one set of MoE sizes for per-block operating points (module docstring, "Per-block plans"):
    the leading blocks that run every expert are dense MLPs; every later block is padded to S shared experts,
    K chosen routed experts per token and R routed experts."""

    points: tuple[OperatingPoint, ...]
    dense_blocks: int
    experts: int | None = None  # E of every sparse block; None: every block dense
    shared: int = 0  # S = max s_b
    experts_per_token: int = 1  # K = max (k_b − s_b)
    routed_experts: int = 1  # R = E + K − min k_b

    def chosen_padding(self, index: int) -> int:
        """Zero experts every token of sparse block `index` chooses: K − (k_b − s_b)."""
        return self.experts_per_token - self.points[index].routed_active

    def unused_padding(self, index: int) -> int:
        """Zero experts no token of sparse block `index` chooses, after its E − s_b real and its chosen zero ones."""
        return self.routed_experts - self.points[index].routed - self.chosen_padding(index)


def check_points(points: list[OperatingPoint]) -> ExportLayout:
    """The ExportLayout of these per-block operating points (one E for all: a Partition and a plan have one)."""
    dense = [p.active == p.experts for p in points]
    n_dense = dense.index(False) if False in dense else len(dense)
    sparse = points[n_dense:]
    if not sparse:
        return ExportLayout(tuple(points), n_dense)
    experts, chosen = points[n_dense].experts, max(p.routed_active for p in sparse)
    return ExportLayout(tuple(points), n_dense, experts, max(p.shared for p in sparse), chosen, experts + chosen - min(p.active for p in sparse))


# -- config -------------------------------------------------------------------------------------
def glm4_moe_config(source_config: dict, layout: ExportLayout, expert_width: int, d_ff: int, dtype: torch.dtype, info: dict) -> dict:
    """The Glm4MoeConfig (as a dict) of the exported model: the source's attention, norms, rotary, vocabulary and
    tied embeddings; `layout`'s MoE sizes and `expert_width` for the sparse blocks."""
    from transformers import CONFIG_MAPPING, Glm4MoeConfig

    source = CONFIG_MAPPING[source_config["model_type"]].from_dict(source_config)  # normalises old rope keys into rope_parameters
    head_dim = getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads
    rope = {**dict(source.rope_parameters), "partial_rotary_factor": 1.0}
    config = Glm4MoeConfig(
        vocab_size=source.vocab_size, hidden_size=source.hidden_size, intermediate_size=d_ff,
        num_hidden_layers=source.num_hidden_layers, num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads, head_dim=head_dim, hidden_act=source.hidden_act,
        max_position_embeddings=source.max_position_embeddings, initializer_range=source.initializer_range,
        rms_norm_eps=source.rms_norm_eps, tie_word_embeddings=bool(source.tie_word_embeddings), rope_parameters=rope,
        attention_bias=source_config["model_type"] == "qwen2" or bool(getattr(source, "attention_bias", False)),
        use_qk_norm=source_config["model_type"] == "qwen3", attention_dropout=0.0,
        moe_intermediate_size=expert_width, n_routed_experts=layout.routed_experts, num_experts_per_tok=layout.experts_per_token,
        n_shared_experts=layout.shared, routed_scaling_factor=float(layout.experts_per_token),
        norm_topk_prob=True, n_group=1, topk_group=1, first_k_dense_replace=layout.dense_blocks, num_mtp_layers=0,
        bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id, pad_token_id=source.pad_token_id,
    )
    config.architectures = [ARCHITECTURE]
    config.dtype = dtype
    out = config.to_dict()
    # Engines read these at the top level (vLLM's GLM-4-MoE: partial_rotary_factor defaults to 0.5, MTP layers to 1).
    out |= {"partial_rotary_factor": 1.0, "num_nextn_predict_layers": 0, EXPORT_KEY: info}
    return out


# -- tensors ------------------------------------------------------------------------------------
def router_scale(router_weight: torch.Tensor, router_bias: torch.Tensor, norm_weight: torch.Tensor | None) -> float:
    """The power of two c for one block's routed experts: c = 2^(ROUTER_RANGE_LOG2 − round(log2 R)) with

        R = max( max_e ‖W_r[e] ⊙ γ‖,  max_e |b_r[e]| / BIAS_HEADROOM )

    The first term bounds the typical score x·W_r[e] of an input the block's RMSNorm (weight γ) has brought to unit
    rms: it alone sets how far the sigmoid weights stray from 1. The bias enters the keys linearly (c/4·b_r, exact at
    any size), so it only has to stay small enough that the keys keep float32's finest spacing near 1/2: the second
    term keeps c/4·|b_r| ≤ 2^ROUTER_RANGE_LOG2 · BIAS_HEADROOM / 4. (Counting the bias in full, as a sum, coarsened the
    keys up to ×6 on SmolLM2 blocks whose lsq router gives one expert a bias in the thousands.)"""
    weight = router_weight.double() * (1.0 if norm_weight is None else norm_weight.double())
    spread = max(weight.norm(dim=1).max().item(), router_bias.double().abs().max().item() / BIAS_HEADROOM)
    if not spread > 0:
        return 1.0
    return 2.0 ** (ROUTER_RANGE_LOG2 - round(math.log2(spread)))


#: e_score_correction_bias of the zero experts every token chooses, and of those none chooses: σ + bias is within
#: 1/2 ± 1/8 for every real expert (`router_scale`), so ±1 puts these above, or below, all of them.
CHOSEN_BIAS, UNUSED_BIAS = 1.0, -1.0


def block_tensors(module: MoEFFN, layout: ExportLayout, expert_width: int, dtype: torch.dtype, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Block `module.index`'s FFN tensors under their GLM-4-MoE hub names (mapping and padding in the module docstring);
    `scale` is the block's router scale c (`router_scale`). Each expert's first `expert_width` neurons are its own: the
    pad neurons an MoE checkpoint appends (MoEFFN.from_layer's pad_to) are left out."""
    i = module.index
    prefix = f"model.layers.{i}.mlp."
    cast = lambda t: t.detach().to(dtype).contiguous()  # noqa: E731
    if i < layout.dense_blocks:
        layer = module.to_ffn_layer(original_order=True)
        return {prefix + "gate_proj.weight": cast(layer.w_in), prefix + "up_proj.weight": cast(layer.w_gate),
                prefix + "down_proj.weight": cast(layer.w_out)}
    point, m, d = layout.points[i], expert_width, module.d_model
    n_experts = module.n_experts
    if bool((module.order.view(n_experts, -1)[:, :m] < 0).any()):
        raise MetanetError(f"block {i}: an expert has fewer than {m} neurons before its padding; the MoE checkpoint is not one metanet wrote")
    s, pad_shared = point.shared, (layout.shared - point.shared) * m
    chosen, unused = layout.chosen_padding(i), layout.unused_padding(i)
    router_weight, router_bias = module.router_weight[s:].detach().float() * scale, module.router_bias[s:].detach().float() * (scale / 4)
    if point.active == point.experts:  # every routed expert chosen: exactly, and each weighted exactly 1
        router_weight, router_bias = torch.zeros_like(router_weight), torch.full_like(router_bias, CHOSEN_BIAS)
    zero_rows = lambda n: torch.zeros(n, d)  # noqa: E731
    w_in, w_gate, w_out = module.w_in[:, :m], module.w_gate[:, :m], module.w_out[:, :, :m]  # [E, m, d], [E, m, d], [E, d, m]
    tensors = {
        prefix + "shared_experts.gate_proj.weight": cast(torch.cat([w_in[:s].reshape(s * m, d), zero_rows(pad_shared)])),
        prefix + "shared_experts.up_proj.weight": cast(torch.cat([w_gate[:s].reshape(s * m, d), zero_rows(pad_shared)])),
        prefix + "shared_experts.down_proj.weight": cast(torch.cat([w_out[:s].permute(1, 0, 2).reshape(d, s * m), zero_rows(pad_shared).T], 1)),
        prefix + "gate.weight": torch.cat([router_weight, torch.zeros(chosen + unused, d)]).contiguous(),
        prefix + "gate.e_score_correction_bias": torch.cat([router_bias, torch.full((chosen,), CHOSEN_BIAS), torch.full((unused,), UNUSED_BIAS)]),
    }
    for e in range(s, n_experts):
        expert = f"{prefix}experts.{e - s}."
        tensors |= {expert + "gate_proj.weight": cast(w_in[e]), expert + "up_proj.weight": cast(w_gate[e]),
                    expert + "down_proj.weight": cast(w_out[e])}
    for j in range(n_experts - s, layout.routed_experts):
        expert = f"{prefix}experts.{j}."
        tensors |= {expert + "gate_proj.weight": cast(zero_rows(m)), expert + "up_proj.weight": cast(zero_rows(m)),
                    expert + "down_proj.weight": cast(zero_rows(m).T)}
    return tensors


# -- writing ------------------------------------------------------------------------------------
def export_transformers(
    checkpoint: Checkpoint,
    partition: Partition,
    out: str | Path,
    dtype: torch.dtype | None = None,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Write `partition` of `checkpoint` as a GLM-4-MoE folder `out` that plain transformers loads; returns a summary.

    Refused before anything is written (one-line MetanetError): what `check_exportable` refuses,
    an `out` that holds the source or is a folder other than an MoE checkpoint or an earlier export.
    The folder (config.json, model-*.safetensors with an index, one file per block so that one
    block is in memory at a time, tokenizer and generation files) is built beside `out` under a
    temporary name, loaded back with `AutoModelForCausalLM.from_pretrained` (every tensor present,
    none left over, shapes as the config says), and only then renamed to `out`; on any failure nothing
    is left behind. `dtype` casts every weight but the routers (float32); None keeps the source's.
    """
    layout = check_exportable(checkpoint, partition)
    check_destination(checkpoint, out)
    first_w_in = checkpoint.tensor_names(0)["w_in"]
    dtype = dtype or checkpoint.source.read([first_w_in])[first_w_in].dtype

    def blocks() -> Iterator[tuple[MoEFFN, torch.Tensor | None]]:
        for layer in checkpoint.layers():  # one block in memory at a time
            partition.check_matches(layer.index, layer.fingerprint())
            yield MoEFFN.from_layer(layer, partition.layers[layer.index], layout.points[layer.index]), None if layer.norm is None else layer.norm.weight

    info = {"source": str(checkpoint.path), "source_model_type": checkpoint.config.get("model_type"), "method": partition.method, "router": partition.router}
    return _export(Path(out), dense_parts(checkpoint), layout, checkpoint.d_ff, blocks(), dtype, info, progress)


def export_moe_checkpoint(moe_dir: str | Path, out: str | Path, dtype: torch.dtype | None = None, progress: Callable[[], None] | None = None) -> dict:
    """Write the metanet MoE checkpoint `moe_dir` (from `apply`, `convert` or `heal`: its experts and routers as they
    are, healed ones included) as a GLM-4-MoE folder `out`, as `export_transformers` writes a partition; returns its
    summary. Refused before anything is written: what GLM-4-MoE cannot express (`check_source`, an output bias),
    an `out` that is `moe_dir` or another folder than an MoE checkpoint or an earlier export."""
    moe_dir, out = Path(moe_dir), Path(out)
    config, moe = read_config(moe_dir)
    check_source(config, family_for(config).name, moe_dir.name)
    if moe.get("output_bias"):
        raise MetanetError(f"{moe_dir.name} holds compensation's output bias b_out, which {ARCHITECTURE}'s MLPs cannot hold; "
                           "convert again with --no-output-bias, or keep the metanet format")
    layout = check_points(layer_points(moe))
    check_out_folder(out, moe_dir, _replaceable, REFUSAL)
    parts = dense_parts_of(moe_dir)
    norm_pattern = family_for(config).layout(config).patterns.get("norm.weight")
    dense = parts.read_tensors()

    def norm_weight(i: int) -> torch.Tensor | None:  # stored under the source's name, whatever its prefix
        if norm_pattern is None:
            return None
        return next((tensor for name, tensor in dense.items() if name.endswith(norm_pattern.format(i=i))), None)

    blocks = ((module, norm_weight(module.index)) for module in read_layers(moe_dir))
    info = {"source": moe.get("source"), "source_model_type": config.get("model_type"), "method": moe.get("method"), "router": moe.get("router"),
            "moe_checkpoint": moe_dir.name}
    return _export(out, replace(parts, read_tensors=lambda: dense), layout, moe["d_ff"], blocks, dtype or getattr(torch, moe["dtype"]), info, progress)


def _export(out: Path, parts: DenseParts, layout: ExportLayout, d_ff: int, blocks: Iterator[tuple[MoEFFN, torch.Tensor | None]],
            dtype: torch.dtype, info: dict, progress: Callable[[], None] | None) -> dict:
    """The folder of `export_transformers` from the source's dense parts and each block's MoEFFN with the weight of the
    RMSNorm before it (for its router scale), written beside `out`, verified, then renamed; returns the summary."""
    start = time.perf_counter()
    expert_width = d_ff // layout.experts if layout.experts else d_ff
    info |= {"dense_blocks": layout.dense_blocks, "experts": layout.experts, "active": [p.active for p in layout.points],
             "shared": [p.shared for p in layout.points]}
    config = glm4_moe_config(parts.config, layout, expert_width, d_ff, dtype, info)
    with staged_folder(out) as tmp:
        n_tensors = _write(tmp, parts, config, layout, blocks, expert_width, dtype, progress)
        written = time.perf_counter()
        verify(tmp)
        verified = time.perf_counter()
        size = sum(path.stat().st_size for path in tmp.iterdir())
    n_layers = len(layout.points)
    log.info("wrote and verified the %s folder %s (%d blocks, %d dense, %.1f MB)", ARCHITECTURE, out, n_layers, layout.dense_blocks, size / 1e6)
    return {
        "out": str(out), "architecture": ARCHITECTURE, "n_layers": n_layers, "dense_blocks": layout.dense_blocks,
        "experts": layout.experts, "active": info["active"], "shared": info["shared"], "expert_width": expert_width,
        "experts_per_token": layout.experts_per_token if layout.experts else None, "routed_experts": layout.routed_experts if layout.experts else None,
        "dtype": str(dtype).removeprefix("torch."), "tensors": n_tensors, "size_mb": round(size / 1e6, 3),
        "write_s": round(written - start, 3), "verify_s": round(verified - written, 3),
    }


def _write(tmp: Path, parts: DenseParts, config: dict, layout: ExportLayout, blocks: Iterator[tuple[MoEFFN, torch.Tensor | None]],
           expert_width: int, dtype: torch.dtype, progress: Callable[[], None] | None) -> int:
    """Tokenizer files, one safetensors file for the non-FFN tensors and one per block, the index, and config.json
    (last: it records each block's router scale)."""
    parts.write_files(tmp)
    n_files = len(layout.points) + 1
    name = lambda j: f"model-{j + 1:05d}-of-{n_files:05d}.safetensors"  # noqa: E731
    weight_map, total, scales = {}, 0, []

    def save(tensors: dict[str, torch.Tensor], j: int) -> None:
        nonlocal total
        save_file(tensors, tmp / name(j), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name(j)))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    save({key: (t.to(dtype) if t.is_floating_point() else t).contiguous() for key, t in parts.read_tensors().items()}, 0)
    for module, norm_weight in blocks:
        i, s = module.index, layout.points[module.index].shared
        scale = router_scale(module.router_weight[s:].detach(), module.router_bias[s:].detach(), norm_weight)
        save(block_tensors(module, layout, expert_width, dtype, scale), i + 1)
        scales.append(None if i < layout.dense_blocks else scale)
        if progress:
            progress()
    config[EXPORT_KEY]["router_scales"] = scales
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return len(weight_map)


def verify(folder: Path) -> None:
    """Load `folder` with plain `AutoModelForCausalLM.from_pretrained`; MetanetError unless every weight the model needs
    was in the files, none was left over and every shape matched."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, local_files_only=True)
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if type(model).__name__ != ARCHITECTURE or any(problems.values()):
        kind, keys = next(((k, v) for k, v in problems.items() if v), ("class", [type(model).__name__]))
        raise MetanetError(f"the written {ARCHITECTURE} folder does not load cleanly: {kind.replace('_', ' ')} {keys[0]}"
                           + (f" and {len(keys) - 1} more" if len(keys) > 1 else ""))
    del model


REFUSAL = "neither an MoE checkpoint nor a transformers export"


def check_destination(checkpoint: Checkpoint, out: str | Path) -> None:
    """Refuse an `out` that holds the source, or an existing non-empty folder that is neither an MoE checkpoint nor an export."""
    check_out_folder(Path(out), checkpoint.folder, _replaceable, REFUSAL)


def _replaceable(folder: Path) -> bool:
    return is_export(folder) or is_moe_checkpoint(folder)


def is_export(folder: Path) -> bool:
    try:
        return EXPORT_KEY in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
