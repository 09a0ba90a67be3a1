"""Decode path (T ≤ 4 tokens): three Triton kernels that read only the selected experts' weights.

No sort and no host synchronisation (so a decode step can be captured in a CUDA graph),
and no other launch: the expert selection, the activation, b_out and the cast to the
output dtype are fused into the three kernels.

    route grid (T,):          s = x_t·W_rᵀ + b_r;  expert e selected iff e < s_shared, or e is
                              routed and fewer than k − s_shared routed experts beat it
                              (higher score, or equal score and lower index)   [skipped when the mask is given]
    up    grid (E, ⌈m/BM⌉):   H[t, e, rows] = act(W_in[e, rows]·x_t + b_in[e, rows]) ⊙ (W_gate[e, rows]·x_t)
                              for the tokens t that selected e, 0 for the others; a program whose
                              expert no token selected returns at once
    down  grid (⌈d/BD⌉,):     y[t, cols] = Σ_{e selected by any token} W_out[e, cols, :] · H[t, e, :] + b_out[cols]

The weights read are those of the union of the tokens' experts: k experts' worth at T = 1.
Tokens are padded to 16 rows so that each block product is one `tl.dot`; weights are
loaded in their own dtype (the bytes that bound decode time) and multiplied in float32.
Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before this module
is imported), which the CPU tests use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from metanet.errors import MetanetError
from metanet.kernels.dispatch import DECODE_MAX_TOKENS as MAX_TOKENS  # most tokens one decode call takes

if TYPE_CHECKING:
    from metanet.moe.module import MoEFFN

#: Token rows of a block product (tl.dot needs ≥ 16).
_TOKEN_ROWS = 16


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """act(z) for the names of metanet.checkpoints.ACTIVATIONS."""
    if ACTIVATION == "relu":
        out = tl.maximum(z, 0.0)
    elif ACTIVATION == "silu":
        out = z * tl.sigmoid(z)
    elif ACTIVATION == "gelu":
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))  # z·Φ(z)
    else:  # gelu_tanh: tanh(u) = 2σ(2u) − 1
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = z * tl.sigmoid(2.0 * u)
    return out


@triton.jit
def _route_kernel(
    x_ptr, router_weight_ptr, router_bias_ptr, use_ptr,
    n_experts, d_model, shared, routed_active,
    EXPERT_LANES: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    experts = tl.arange(0, EXPERT_LANES)  # [EL] ≥ E, a power of two
    is_expert = experts < n_experts
    scores = tl.zeros((EXPERT_LANES,), dtype=tl.float32)
    for start in range(0, d_model, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + token * d_model + cols, mask=cols < d_model, other=0.0).to(tl.float32)  # [BD]
        w = tl.load(router_weight_ptr + experts[:, None] * d_model + cols[None, :],
                    mask=is_expert[:, None] & (cols[None, :] < d_model), other=0.0).to(tl.float32)  # [EL, BD]
        scores += tl.sum(w * x[None, :], axis=1)
    scores += tl.load(router_bias_ptr + experts, mask=is_expert, other=0.0).to(tl.float32)
    routed = is_expert & (experts >= shared)
    # beats[i, j]: routed expert j ranks above expert i
    beats = routed[None, :] & ((scores[None, :] > scores[:, None]) | ((scores[None, :] == scores[:, None]) & (experts[None, :] < experts[:, None])))
    rank = tl.sum(beats.to(tl.int32), axis=1)  # [EL] routed experts ranked above each expert
    selected = (is_expert & (experts < shared)) | (routed & (rank < routed_active))
    tl.store(use_ptr + token * n_experts + experts, selected.to(tl.uint8), mask=is_expert)


@triton.jit
def _up_kernel(
    x_ptr, use_ptr, w_in_ptr, w_gate_ptr, b_in_ptr, h_ptr,
    n_tokens, n_experts, width, d_model,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    TOKEN_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    expert = tl.program_id(0)
    tokens = tl.arange(0, TOKEN_ROWS)  # [16]
    is_token = tokens < n_tokens
    use = tl.load(use_ptr + tokens * n_experts + expert, mask=is_token, other=0).to(tl.int32)  # [16] 1 where token t selected this expert
    if tl.max(use, axis=0) > 0:
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] neurons of this expert
        expert_offset = expert.to(tl.int64) * width * d_model
        z = tl.zeros((TOKEN_ROWS, BLOCK_M), dtype=tl.float32)
        gate = tl.zeros((TOKEN_ROWS, BLOCK_M), dtype=tl.float32)
        for start in range(0, d_model, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)  # [BD]
            x = tl.load(x_ptr + tokens[:, None] * d_model + cols[None, :],
                        mask=is_token[:, None] & (cols[None, :] < d_model), other=0.0).to(tl.float32)  # [16, BD]
            block = expert_offset + rows[:, None] * d_model + cols[None, :]
            in_block = (rows[:, None] < width) & (cols[None, :] < d_model)
            w = tl.load(w_in_ptr + block, mask=in_block, other=0.0).to(tl.float32)  # [BM, BD]
            z = tl.dot(x, tl.trans(w), z)
            if GATED:
                g = tl.load(w_gate_ptr + block, mask=in_block, other=0.0).to(tl.float32)
                gate = tl.dot(x, tl.trans(g), gate)
        if HAS_BIAS:
            z += tl.load(b_in_ptr + expert * width + rows, mask=rows < width, other=0.0).to(tl.float32)[None, :]
        h = _activation(z, ACTIVATION)
        if GATED:
            h = h * gate
        h = tl.where(use[:, None] > 0, h, 0.0)  # tokens that did not select this expert add nothing
        tl.store(h_ptr + tokens[:, None] * n_experts * width + expert * width + rows[None, :], h,
                 mask=is_token[:, None] & (rows[None, :] < width))


@triton.jit
def _down_kernel(
    h_ptr, use_ptr, w_out_ptr, b_out_ptr, y_ptr,
    n_tokens, n_experts, width, d_model,
    HAS_BIAS: tl.constexpr, TOKEN_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    tokens = tl.arange(0, TOKEN_ROWS)
    is_token = tokens < n_tokens
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD] output coordinates
    acc = tl.zeros((TOKEN_ROWS, BLOCK_D), dtype=tl.float32)
    for expert in range(n_experts):
        use = tl.load(use_ptr + tokens * n_experts + expert, mask=is_token, other=0).to(tl.int32)
        if tl.max(use, axis=0) > 0:
            expert_offset = tl.cast(expert, tl.int64) * d_model * width
            for start in range(0, width, BLOCK_M):
                neurons = start + tl.arange(0, BLOCK_M)  # [BM]
                h = tl.load(h_ptr + tokens[:, None] * n_experts * width + expert * width + neurons[None, :],
                            mask=is_token[:, None] & (neurons[None, :] < width), other=0.0)  # [16, BM]
                w = tl.load(w_out_ptr + expert_offset + cols[:, None] * width + neurons[None, :],
                            mask=(cols[:, None] < d_model) & (neurons[None, :] < width), other=0.0).to(tl.float32)  # [BD, BM]
                acc = tl.dot(h, tl.trans(w), acc)  # [16, BD]
    if HAS_BIAS:
        acc += tl.load(b_out_ptr + cols, mask=cols < d_model, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + tokens[:, None] * d_model + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=is_token[:, None] & (cols[None, :] < d_model))


@dataclass(frozen=True)
class Launch:
    """One kernel launch: kernel[grid](**arguments), launch options included (num_warps)."""

    kernel: triton.JITFunction
    grid: tuple[int, ...]
    arguments: dict


def decode_output(
    ffn: MoEFFN, tokens: torch.Tensor, mask: torch.Tensor | None = None,
    up_block: tuple[int, int] = (32, 128), down_block: tuple[int, int] = (32, 128), num_warps: int = 4,
) -> torch.Tensor:
    """y = Σ_e mask[t, e] · y_e(x_t) + b_out in the tokens' dtype, for at most MAX_TOKENS tokens.

    tokens: [T, d], mask: bool [T, E], or None for the router's own selection → y: [T, d]
    up_block = (BLOCK_M, BLOCK_D) of the up kernel, down_block = (BLOCK_D, BLOCK_M) of the
    down kernel (powers of two ≥ 16); benchmarks/moe_kernels.py --tune measures them.
    """
    n_tokens, d = tokens.shape
    n_experts, width, _ = ffn.w_in.shape
    if n_tokens > MAX_TOKENS:
        raise MetanetError(f"the decode kernel takes at most {MAX_TOKENS} tokens, got {n_tokens}")
    x = _plain(tokens).contiguous()
    if mask is None:
        use = torch.empty((n_tokens, n_experts), dtype=torch.uint8, device=x.device)  # [T, E] 1 = selected, written by the route kernel
    else:
        use = mask.contiguous().view(torch.uint8)  # [T, E] the bool mask's bytes, no copy
    h = torch.empty((n_tokens, n_experts, width), dtype=torch.float32, device=x.device)  # read only where use = 1
    y = torch.empty((n_tokens, d), dtype=tokens.dtype, device=x.device)
    for launch in launches(ffn, x, use, h, y, mask is None, up_block, down_block, num_warps):
        launch.kernel[launch.grid](**launch.arguments)
    return y


def launches(
    ffn: MoEFFN, x: torch.Tensor, use: torch.Tensor, h: torch.Tensor, y: torch.Tensor, route: bool,
    up_block: tuple[int, int], down_block: tuple[int, int], num_warps: int,
) -> list[Launch]:
    """The launches of one decode call (route only when `route`), for decode_output and for compiling
    them ahead of time (benchmarks/decode_sass.py).   x: [T, d], use: uint8 [T, E], h: float32 [T, E, m], y: [T, d]"""
    n_tokens, d = x.shape
    n_experts, width, _ = ffn.w_in.shape
    w_in, w_gate, b_in, w_out, b_out = (None if t is None else _plain(t) for t in (ffn.w_in, ffn.w_gate, ffn.b_in, ffn.w_out, ffn.b_out))
    shape = {"n_tokens": n_tokens, "n_experts": n_experts, "width": width, "d_model": d}
    block_m, block_d = up_block
    calls = [] if not route else [Launch(_route_kernel, (n_tokens,), {
        "x_ptr": x, "router_weight_ptr": _plain(ffn.router_weight), "router_bias_ptr": _plain(ffn.router_bias), "use_ptr": use,
        "n_experts": n_experts, "d_model": d, "shared": ffn.point.shared, "routed_active": ffn.point.routed_active,
        "EXPERT_LANES": max(16, triton.next_power_of_2(n_experts)), "BLOCK_D": 128, "num_warps": num_warps,
    })]
    calls.append(Launch(_up_kernel, (n_experts, triton.cdiv(width, block_m)), {
        "x_ptr": x, "use_ptr": use, "w_in_ptr": w_in, "w_gate_ptr": w_in if w_gate is None else w_gate,
        "b_in_ptr": w_in if b_in is None else b_in, "h_ptr": h, **shape,
        "ACTIVATION": ffn.activation, "GATED": w_gate is not None, "HAS_BIAS": b_in is not None,
        "TOKEN_ROWS": _TOKEN_ROWS, "BLOCK_M": block_m, "BLOCK_D": block_d, "num_warps": num_warps,
    }))
    block_d, block_m = down_block
    calls.append(Launch(_down_kernel, (triton.cdiv(d, block_d),), {
        "h_ptr": h, "use_ptr": use, "w_out_ptr": w_out, "b_out_ptr": w_out if b_out is None else b_out, "y_ptr": y, **shape,
        "HAS_BIAS": b_out is not None, "TOKEN_ROWS": _TOKEN_ROWS, "BLOCK_D": block_d, "BLOCK_M": block_m, "num_warps": num_warps,
    }))
    return calls


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor without autograd history where it has any (Triton's interpreter reads tensors through numpy);
    a loaded model's parameters need nothing, which saves a microsecond per tensor on every decode call."""
    return tensor.detach() if tensor.requires_grad else tensor
