"""Per-layer quality of a partition and its router on held-out FFN inputs (DESIGN.md "Metrics").

With Y the dense FFN output, Y_moe the MoE output under the partition's own router and
Y_oracle under oracle routing (top experts by ‖y_e(x)‖), over all held-out tokens:

    rel_error         ‖Y − Y_moe‖_F / ‖Y‖_F
    oracle_rel_error  ‖Y − Y_oracle‖_F / ‖Y‖_F
    mass_recall       Σ |a_tj| over neurons of the experts the router chose / Σ |a_tj|
    router_recall     |router's routed top-(k−s) ∩ oracle's| / (k−s), averaged over tokens
    load_cv           std / mean of the number of tokens each routed expert receives
    active_fraction   FFN parameters a token touches / all FFN parameters
"""

from __future__ import annotations

import math

import torch

from metanet.checkpoints import FFNLayer
from metanet.moe.routing import expert_output_norms, moe_forward, select_experts
from metanet.partition.partition import LayerPartition, OperatingPoint

METRICS = ("rel_error", "oracle_rel_error", "mass_recall", "router_recall", "load_cv", "active_fraction")


@torch.no_grad()
def layer_metrics(layer: FFNLayer, lp: LayerPartition, point: OperatingPoint, x: torch.Tensor, batch_tokens: int = 1024) -> dict:
    """All METRICS for one layer.   x: [T, d] held-out FFN inputs.

    The MoE is carved from `lp.carve(layer)` (its compensated down projection, if any); Y is the dense layer's.
    """
    carved = lp.carve(layer)
    sums = dict.fromkeys(("dense", "moe", "oracle", "mass_chosen", "mass", "overlap"), 0.0)
    load = torch.zeros(point.experts, dtype=torch.float64, device=x.device)
    for xb in x.split(batch_tokens):
        y = layer.forward(xb)
        mask = select_experts(lp.scores(xb), point)  # [t, E]
        oracle_mask = select_experts(expert_output_norms(carved, lp.assign, xb, point.experts), point)
        sums["dense"] += y.double().pow(2).sum().item()
        sums["moe"] += (y - moe_forward(carved, lp.assign, mask, xb)).double().pow(2).sum().item()
        sums["oracle"] += (y - moe_forward(carved, lp.assign, oracle_mask, xb)).double().pow(2).sum().item()
        mass = layer.hidden(xb).abs().double()  # [t, f]
        sums["mass"] += mass.sum().item()
        sums["mass_chosen"] += (mass * mask[:, lp.assign]).sum().item()
        routed, oracle_routed = mask[:, point.shared :], oracle_mask[:, point.shared :]
        sums["overlap"] += (routed & oracle_routed).sum().item()
        load += mask.sum(0).double()
    n_tokens = x.shape[0]
    routed_load = load[point.shared :]
    return {
        "rel_error": math.sqrt(sums["moe"] / sums["dense"]),
        "oracle_rel_error": math.sqrt(sums["oracle"] / sums["dense"]),
        "mass_recall": sums["mass_chosen"] / sums["mass"],
        "router_recall": sums["overlap"] / (n_tokens * point.routed_active) if point.routed_active else 1.0,
        "load_cv": (routed_load.std(unbiased=False) / routed_load.mean()).item() if point.routed else 0.0,
        "active_fraction": active_fraction(layer, point),
        "expert_load": load.long().tolist(),  # tokens per expert (shared experts receive every token)
    }


def active_fraction(layer: FFNLayer, point: OperatingPoint) -> float:
    """(k·m·(params per neuron) + |b_out|) / all FFN parameters."""
    m = layer.d_ff // point.experts
    per_neuron = layer.d_model * (3 if layer.gated else 2) + (1 if layer.b_in is not None else 0)
    touched = point.active * m * per_neuron + (layer.d_model if layer.b_out is not None else 0)
    return touched / layer.n_params


def mean_over_layers(per_layer: list[dict]) -> dict:
    return {name: sum(row[name] for row in per_layer) / len(per_layer) for name in METRICS}
