"""Mixture-of-Experts: reference routing arithmetic, the MoEFFN module and model conversion."""

from metanet.moe.convert import CONVERTIBLE_FAMILIES, convert, dense_ffn_layers
from metanet.moe.module import MoEFFN
from metanet.moe.routing import expert_output_norms, moe_forward, select_experts

__all__ = [
    "CONVERTIBLE_FAMILIES", "MoEFFN", "convert", "dense_ffn_layers",
    "expert_output_norms", "moe_forward", "select_experts",
]
