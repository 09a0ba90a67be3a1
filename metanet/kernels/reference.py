"""Reference path: Σ_e mask[t, e] · y_e(x_t) in plain torch, expert by expert.

For each expert e: gather the tokens that selected it, run its slice of the FFN,

    y_e = W_out[e] · ( act(W_in[e]·x + b_in[e]) ⊙ (W_gate[e]·x) )      (gate factor only for gated layers)

and index_add the result into a float32 sum. Works on any device and dtype and is
differentiable; the other paths are checked against it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from metanet.checkpoints import ACTIVATIONS

if TYPE_CHECKING:
    from metanet.moe.module import MoEFFN


def reference_sum(ffn: MoEFFN, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_e mask[t, e] · y_e(x_t).   tokens: [T, d], mask: bool [T, E] → float32 [T, d]"""
    act = ACTIVATIONS[ffn.activation]
    y = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)  # [T, d]
    for e in range(ffn.n_experts):
        rows = mask[:, e].nonzero().squeeze(1)  # [n_e] tokens that run expert e
        if rows.numel() == 0:
            continue
        xe = tokens[rows]  # [n_e, d]
        h = act(F.linear(xe, ffn.w_in[e], None if ffn.b_in is None else ffn.b_in[e]))  # [n_e, m]
        if ffn.w_gate is not None:
            h = h * F.linear(xe, ffn.w_gate[e])
        y.index_add_(0, rows, F.linear(h, ffn.w_out[e]).float())  # [n_e, m]·[d, m]ᵀ → [n_e, d]
    return y
