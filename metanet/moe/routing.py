"""Reference MoE arithmetic on one canonical FFN layer (plain torch, any device).

Carving a dense FFN into experts groups its hidden neurons: expert e owns the neurons
j with assign[j] = e, and its output is  y_e(x) = Σ_{j∈e} a_j(x) w_out[:, j].
The dense output is  Σ_e y_e(x) + b_out,  so an MoE that runs every expert (k = E)
reproduces the dense layer exactly; with k < E a token runs the shared experts plus
the k − s routed experts its router scores highest.
"""

from __future__ import annotations

import torch

from metanet.checkpoints import FFNLayer
from metanet.partition.partition import OperatingPoint


def select_experts(scores: torch.Tensor, point: OperatingPoint) -> torch.Tensor:
    """Boolean mask of the experts each token runs: shared experts always, then the top k−s routed.

    scores: [T, E] (shared columns ignored) → mask [T, E]
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[:, : point.shared] = True
    if point.routed_active > 0:
        top = scores[:, point.shared :].topk(point.routed_active, dim=1).indices + point.shared
        mask.scatter_(1, top, True)
    return mask


def expert_output_norms(layer: FFNLayer, assign: torch.Tensor, x: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Oracle scores ‖y_e(x)‖ = ‖Σ_{j∈e} a_j(x) w_out[:, j]‖ for every expert.   x: [T, d] → [T, E]"""
    a = layer.hidden(x)  # [T, f]
    order = torch.argsort(assign, stable=True)
    sizes = torch.bincount(assign, minlength=n_experts).tolist()
    norms = [
        (a[:, idx] @ layer.w_out[:, idx].T).norm(dim=1)  # [T]
        for idx in torch.split(order, sizes)
    ]
    return torch.stack(norms, dim=1)


def moe_forward(layer: FFNLayer, assign: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y = Σ_e mask[t, e] · y_e(x_t) + b_out.   x: [T, d], mask: [T, E] → y: [T, d]"""
    a = layer.hidden(x) * mask[:, assign]  # [T, f]: neurons of unselected experts zeroed
    return torch.nn.functional.linear(a, layer.w_out, layer.b_out)
