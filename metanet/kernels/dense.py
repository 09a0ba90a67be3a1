"""Dense path: the whole FFN for every token, with the neurons of unselected experts zeroed.

    H = act(x · W_inᵀ + b_in) ⊙ (x · W_gateᵀ)          [T, E·m]   (all experts: one GEMM each)
    H[t, e, :] ← 0  where mask[t, e] is false
    y = Σ_e H[:, e, :] · W_out[e]ᵀ                      [T, d]     (one batched GEMM over e, summed in float32)

It reads every weight once and does the dense FFN's FLOPs, so it costs what the dense
layer costs: the right path when the tokens' selected experts together cover most of
the layer and the layer is bandwidth-bound (a few to a few hundred tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from metanet.checkpoints import ACTIVATIONS

if TYPE_CHECKING:
    from metanet.moe.module import MoEFFN


def dense_sum(ffn: MoEFFN, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_e mask[t, e] · y_e(x_t) through the dense FFN.   tokens: [T, d], mask: bool [T, E] → float32 [T, d]"""
    n_experts, m, d = ffn.w_in.shape
    n_tokens = tokens.shape[0]
    flat = lambda w: w.reshape(n_experts * m, d)  # noqa: E731   [E, m, d] → [E·m, d], a view
    h = ACTIVATIONS[ffn.activation](F.linear(tokens, flat(ffn.w_in), None if ffn.b_in is None else ffn.b_in.reshape(-1)))
    if ffn.w_gate is not None:
        h = h * F.linear(tokens, flat(ffn.w_gate))
    h = h.reshape(n_tokens, n_experts, m) * mask[:, :, None].to(h.dtype)  # [T, E, m]
    per_expert = torch.bmm(h.transpose(0, 1), ffn.w_out.transpose(1, 2))  # [E, T, m]·[E, m, d] → [E, T, d]
    return per_expert.sum(0, dtype=torch.float32)
