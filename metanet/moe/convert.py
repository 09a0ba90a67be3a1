"""Swap every FFN of a transformers model for an MoEFFN, in place, family by family.

For block i the canonical FFNLayer is read from the model's own modules
(`dense_ffn_layers`), checked against the partition's fingerprint for layer i, carved
into an MoEFFN and installed where the family's FFN lives, so that the block's own
forward runs it unchanged:

    gpt2      block.mlp                      ← MoEFFN      (GPT2MLP's dropout goes with it)
    bert      layer.intermediate             ← MoEFFN      (returns the whole FFN output y)
              layer.output.dense             ← Identity    (BertOutput: LayerNorm(dropout(y) + input))
    opt       layer.fc1                      ← MoEFFN
              layer.activation_fn, layer.fc2 ← Identity    (OPTDecoderLayer: fc2(act(fc1(x))) = y)
    gpt_neox  layer.mlp                      ← MoEFFN
    llama     layer.mlp                      ← MoEFFN      (also Mistral, Qwen2, Qwen3)

`family` is `Checkpoint.family.name`. With k = E the converted model computes what
the dense one does; with k < E each FFN output is `metanet.moe.routing.moe_forward`
of its router's selection. `install` puts ready-made MoEFFNs in the same places (what
`metanet.moe.load` does with the modules of an MoE checkpoint).
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

from torch import nn

from metanet.checkpoints import FAMILIES, FFNLayer, Norm
from metanet.checkpoints.families import Family, Layout
from metanet.errors import MetanetError
from metanet.moe.module import MoEFFN
from metanet.partition.partition import Partition

log = logging.getLogger(__name__)


# -- norms ------------------------------------------------------------------------------
def _layernorm(module: nn.LayerNorm) -> Norm:
    if module.weight is None:  # elementwise_affine=False
        raise MetanetError("LayerNorm without a learned weight (elementwise_affine=False) is not supported")
    bias = None if module.bias is None else module.bias.detach()
    return Norm("layernorm", module.weight.detach(), bias, module.eps)


def _rmsnorm(module: nn.Module) -> Norm:
    return Norm("rmsnorm", module.weight.detach(), None, module.variance_epsilon)


# -- gpt2: GPT2Block.mlp = GPT2MLP(c_fc, act, c_proj, dropout); Conv1D weights are [in, out] ---------
def _gpt2_blocks(model: nn.Module) -> nn.ModuleList:
    return model.base_model.h


def _gpt2_ffn(block: nn.Module, layout: Layout, i: int) -> FFNLayer:
    mlp = block.mlp
    return FFNLayer(
        w_in=mlp.c_fc.weight.detach().T.contiguous(),  # [d, f] → [f, d]
        w_out=mlp.c_proj.weight.detach().T.contiguous(),  # [f, d] → [d, f]
        b_in=mlp.c_fc.bias.detach(),
        b_out=mlp.c_proj.bias.detach(),
        activation=layout.activation, norm=_layernorm(block.ln_2), index=i, family="gpt2",
    )


def _gpt2_install(block: nn.Module, moe: MoEFFN) -> None:
    block.mlp = moe


# -- bert: BertLayer.intermediate = dense + act; BertOutput = LayerNorm(dropout(dense(·)) + input) ---
def _bert_blocks(model: nn.Module) -> nn.ModuleList:
    return model.base_model.encoder.layer


def _bert_ffn(block: nn.Module, layout: Layout, i: int) -> FFNLayer:
    fc_in, fc_out = block.intermediate.dense, block.output.dense
    return FFNLayer(
        w_in=fc_in.weight.detach(), w_out=fc_out.weight.detach(),
        b_in=fc_in.bias.detach(), b_out=fc_out.bias.detach(),
        activation=layout.activation,
        norm=_layernorm(block.attention.output.LayerNorm),  # post-LN: the FFN reads the attention block's output
        index=i, family="bert",
    )


def _bert_install(block: nn.Module, moe: MoEFFN) -> None:
    block.intermediate = moe
    block.output.dense = nn.Identity()


# -- opt: OPTDecoderLayer runs fc2(activation_fn(fc1(x))) inline on [T, d] ----------------------------
def _opt_blocks(model: nn.Module) -> nn.ModuleList:
    return model.base_model.decoder.layers


def _opt_ffn(block: nn.Module, layout: Layout, i: int) -> FFNLayer:
    # Pre-LN OPT normalises with final_layer_norm; post-LN OPT (350m) feeds the FFN the attention block's norm.
    norm = block.final_layer_norm if block.do_layer_norm_before else block.self_attn_layer_norm
    bias = lambda t: None if t is None else t.detach()  # noqa: E731   enable_bias=False
    return FFNLayer(
        w_in=block.fc1.weight.detach(), w_out=block.fc2.weight.detach(),
        b_in=bias(block.fc1.bias), b_out=bias(block.fc2.bias),
        activation=layout.activation, norm=_layernorm(norm), index=i, family="opt",
    )


def _opt_install(block: nn.Module, moe: MoEFFN) -> None:
    block.fc1 = moe
    block.activation_fn = nn.Identity()
    block.fc2 = nn.Identity()


# -- gpt_neox: GPTNeoXLayer.mlp = GPTNeoXMLP(dense_h_to_4h, act, dense_4h_to_h) ----------------------
def _gpt_neox_blocks(model: nn.Module) -> nn.ModuleList:
    return model.base_model.layers


def _gpt_neox_ffn(block: nn.Module, layout: Layout, i: int) -> FFNLayer:
    mlp = block.mlp
    return FFNLayer(
        w_in=mlp.dense_h_to_4h.weight.detach(), w_out=mlp.dense_4h_to_h.weight.detach(),
        b_in=mlp.dense_h_to_4h.bias.detach(), b_out=mlp.dense_4h_to_h.bias.detach(),
        activation=layout.activation, norm=_layernorm(block.post_attention_layernorm), index=i, family="gpt_neox",
    )


def _gpt_neox_install(block: nn.Module, moe: MoEFFN) -> None:
    block.mlp = moe


# -- llama (mistral, qwen2, qwen3): mlp = down_proj(act(gate_proj(x)) ⊙ up_proj(x)), no biases --------
def _llama_blocks(model: nn.Module) -> nn.ModuleList:
    return model.base_model.layers


def _llama_ffn(block: nn.Module, layout: Layout, i: int) -> FFNLayer:
    mlp = block.mlp
    return FFNLayer(
        w_in=mlp.gate_proj.weight.detach(),  # activated branch
        w_gate=mlp.up_proj.weight.detach(),  # linear multiplier
        w_out=mlp.down_proj.weight.detach(),
        activation=layout.activation, norm=_rmsnorm(block.post_attention_layernorm), index=i, family="llama",
    )


def _llama_install(block: nn.Module, moe: MoEFFN) -> None:
    block.mlp = moe


class _FamilyOps(NamedTuple):
    blocks: Callable[[nn.Module], nn.ModuleList]  # model → its transformer blocks
    ffn: Callable[[nn.Module, Layout, int], FFNLayer]  # (block, layout, i) → canonical FFN
    install: Callable[[nn.Module, MoEFFN], None]  # put the MoEFFN where the block's forward runs it


_OPS: dict[str, _FamilyOps] = {
    "gpt2": _FamilyOps(_gpt2_blocks, _gpt2_ffn, _gpt2_install),
    "bert": _FamilyOps(_bert_blocks, _bert_ffn, _bert_install),
    "opt": _FamilyOps(_opt_blocks, _opt_ffn, _opt_install),
    "gpt_neox": _FamilyOps(_gpt_neox_blocks, _gpt_neox_ffn, _gpt_neox_install),
    "llama": _FamilyOps(_llama_blocks, _llama_ffn, _llama_install),
}

#: Family names `convert` and `dense_ffn_layers` accept.
CONVERTIBLE_FAMILIES = tuple(_OPS)


# -- public -----------------------------------------------------------------------------
def dense_ffn_layers(model: nn.Module, family: str) -> list[FFNLayer]:
    """Every block's FFN of a (dense) transformers model as a canonical FFNLayer, norm included.

    Tensors are detached views of the model's parameters (GPT-2: transposed copies).
    """
    ops, family_spec, blocks = _resolve(model, family)
    layout = family_spec.layout(model.config.to_dict())
    for i, block in enumerate(blocks):
        if any(isinstance(child, MoEFFN) for child in block.modules()):
            raise MetanetError(f"block {i} of the model already runs an MoEFFN (the model was converted before)")
    return [ops.ffn(block, layout, i) for i, block in enumerate(blocks)]


def convert(model: nn.Module, family: str, partition: Partition) -> nn.Module:
    """Replace every FFN of `model` by the MoEFFN `partition` describes, in place; returns `model`.

    Raises MetanetError for an unknown family, a model of another family, a partition
    with another number of layers, or one made for other weights (fingerprint check).
    """
    layers = dense_ffn_layers(model, family)
    partition.check_layer_count(len(layers))
    for layer in layers:  # check everything before changing anything
        partition.check_matches(layer.index, layer.fingerprint())
    install(model, family, [MoEFFN.from_layer(layer, partition.layers[layer.index], partition.layer_point(layer.index)) for layer in layers])
    p = partition.point
    log.debug("converted %d %s FFN layers to MoE: E=%d, k=%d, shared=%d, expert width %d (partition %s/%s)",
             len(layers), family, p.experts, p.active, p.shared, layers[0].d_ff // p.experts if layers else 0,
             partition.method, partition.router)
    return model


def model_blocks(model: nn.Module, family: str) -> nn.ModuleList:
    """The transformer blocks of `model`, in order (MetanetError unless it has `family`'s layout)."""
    return _resolve(model, family)[2]


def install_block(model: nn.Module, family: str, index: int, module: MoEFFN) -> None:
    """Put `module` where block `index`'s FFN runs (table in the module docstring), in place."""
    ops, _, blocks = _resolve(model, family)
    ops.install(blocks[index], module)


def install(model: nn.Module, family: str, modules: list[MoEFFN]) -> nn.Module:
    """Put modules[i] where block i's FFN runs (table in the module docstring), in place; returns `model`.

    `convert` carves the modules from the model's own FFNs; `metanet.moe.load` builds them
    from the tensors of an MoE checkpoint. Raises MetanetError unless there is one module per block.
    """
    ops, _, blocks = _resolve(model, family)
    if len(modules) != len(blocks):
        raise MetanetError(f"{len(modules)} MoE layers for a model of {len(blocks)} blocks")
    for block, moe in zip(blocks, modules):
        ops.install(block, moe)
    return model


def _resolve(model: nn.Module, family: str) -> tuple[_FamilyOps, Family, nn.ModuleList]:
    if family not in _OPS:
        raise MetanetError(f"unknown model family {family!r}; supported: {', '.join(CONVERTIBLE_FAMILIES)}")
    family_spec = next(f for f in FAMILIES if f.name == family)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in family_spec.model_types:
        raise MetanetError(
            f"the model is not a {family} model (model_type={model_type!r}; {family} covers {', '.join(family_spec.model_types)})"
        )
    try:
        blocks = _OPS[family].blocks(model)
    except AttributeError as exc:
        raise MetanetError(f"{type(model).__name__} does not have the {family} block layout ({exc})") from None
    return _OPS[family], family_spec, blocks
