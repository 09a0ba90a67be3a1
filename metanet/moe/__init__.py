"""Mixture-of-Experts: reference routing arithmetic, the MoEFFN module, model conversion and the MoE checkpoint."""

from metanet.moe.checkpoint import apply, load
from metanet.moe.convert import CONVERTIBLE_FAMILIES, convert, dense_ffn_layers, install
from metanet.moe.module import MoEFFN
from metanet.moe.routing import expert_output_norms, moe_forward, select_experts

__all__ = [
    "CONVERTIBLE_FAMILIES", "MoEFFN", "apply", "convert", "dense_ffn_layers", "expert_output_norms",
    "install", "load", "moe_forward", "select_experts",
]
