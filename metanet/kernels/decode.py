"""Decode path (T ≤ 16 tokens): three Triton kernels that read only the selected experts' weights.

No sort and no host synchronisation (so a decode step can be captured in a CUDA graph),
and no other launch: the router, the expert selection, the activation, b_out and the cast
to the output dtype are fused into the three kernels.

    score grid (E,):          s[t, e] = x_t·W_r[e] + b_r[e] for every token   [skipped when the mask is given]
    up    grid (E, ⌈m/BM⌉):   use[t, e] = 1 iff e < s_shared, or e is routed and fewer than k − s_shared
                              routed experts beat it (higher score, or equal score and lower index);
                              read from the mask when given, else ranked from s and written by program (e, 0)
                              H[t, e, rows] = act(W_in[e, rows]·x_t + b_in[e, rows]) ⊙ (W_gate[e, rows]·x_t)
                              for the tokens t that selected e, 0 for the others; a program whose
                              expert no token selected returns at once
    down  grid (⌈d/BD⌉,):     y[t, cols] = Σ_{e selected by any token} W_out[e, cols, :] · H[t, e, :] + b_out[cols]
                              (the union of the tokens' experts is read from `use` in one load, and
                              one software pipeline runs over all its experts' neuron blocks)

A call allocates y and one float32 work buffer that holds H, the scores and the selection (`_scratch`),
and reuses launches built once per layer kind and token count: at T = 1 the GPU work is so short
that an eager call's host time matters.

The weights read are those of the union of the tokens' experts: k experts' worth at T = 1.
Latency, not bandwidth, is what a decode kernel loses time to, so: the router runs on E
programs at once, each with all of its row's loads in flight (one program streaming W_r block
by block waits on memory once per block: ~32 round trips at d=4096); the down kernel neither
waits on one load per expert to learn whether it is selected nor restarts its pipeline per expert.
Tokens are padded to 16 rows so that each block product is one `tl.dot`; weights are
loaded in their own dtype (the bytes that bound decode time) and multiplied in float32: on tensor
cores as TF32 for 16-bit weights (their values are exact in TF32; the float32 activations H lose
their last 13 mantissa bits, ~1e-4 relative), as exact float32 products for float32 weights.
Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before this module
is imported), which the CPU tests use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from metanet.errors import MetanetError
from metanet.kernels.dispatch import DECODE_MAX_TOKENS as MAX_TOKENS  # most tokens one decode call takes

if TYPE_CHECKING:
    from metanet.moe.module import MoEFFN

#: Token rows of a block product (tl.dot needs ≥ 16; a call takes at most this many tokens).
_TOKEN_ROWS = MAX_TOKENS
#: The score kernel holds at most SCORE_ELEMENTS of x (T' × BLOCK_D, T' = T rounded up to a power of two;
#: 64 float32 registers a thread with SCORE_WARPS warps): blocks of 4096 columns for T ≤ 4, 1024 at T = 16.
#: Where d fits one block, all of a router row's loads are in flight at once.
SCORE_ELEMENTS, SCORE_WARPS = 16384, 8


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
def _scratch(work_ptr, mask_ptr, n_tokens, n_experts, width, ROUTE: tl.constexpr):
    """(H, scores, use) pointers of a call. H [T, E, m] starts its one float32 work buffer; when the kernels route,
    the scores [T, E] and use [T, E] (1.0 = selected) follow it there; else use is the given mask (uint8 [T, E])."""
    scores_ptr = work_ptr + n_tokens * n_experts * width
    if ROUTE:
        use_ptr = scores_ptr + n_tokens * n_experts
    else:
        use_ptr = mask_ptr
    return work_ptr, scores_ptr, use_ptr


@triton.jit
def _score_kernel(
    x_ptr, router_weight_ptr, router_bias_ptr, work_ptr,
    n_tokens, n_experts, width, d_model,
    TOKEN_LANES: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _, scores_ptr, _ = _scratch(work_ptr, work_ptr, n_tokens, n_experts, width, True)
    expert = tl.program_id(0)
    tokens = tl.arange(0, TOKEN_LANES)  # [TL] ≥ T, a power of two
    is_token = tokens < n_tokens
    scores = tl.zeros((TOKEN_LANES,), dtype=tl.float32)
    for start in range(0, d_model, BLOCK_D):  # one pass when d ≤ BLOCK_D: every load in flight at once
        cols = start + tl.arange(0, BLOCK_D)  # [BD]
        w = tl.load(router_weight_ptr + expert * d_model + cols, mask=cols < d_model, other=0.0).to(tl.float32)  # [BD]
        x = tl.load(x_ptr + tokens[:, None] * d_model + cols[None, :],
                    mask=is_token[:, None] & (cols[None, :] < d_model), other=0.0).to(tl.float32)  # [TL, BD]
        scores += tl.sum(x * w[None, :], axis=1)
    scores += tl.load(router_bias_ptr + expert).to(tl.float32)
    tl.store(scores_ptr + tokens * n_experts + expert, scores, mask=is_token)


@triton.jit
def _selects(scores_ptr, expert, tokens, is_token, n_experts, shared, routed_active, EXPERT_LANES: tl.constexpr):
    """[rows] 1 where token t selects `expert`: e < s_shared, or e routed with fewer than k − s_shared routed experts
    beating it (a higher score, or an equal score and a lower index)."""
    experts = tl.arange(0, EXPERT_LANES)  # [EL] ≥ E, a power of two
    routed = (experts >= shared) & (experts < n_experts)
    scores = tl.load(scores_ptr + tokens[:, None] * n_experts + experts[None, :],
                     mask=is_token[:, None] & routed[None, :], other=0.0)  # [rows, EL]
    mine = tl.load(scores_ptr + tokens * n_experts + expert, mask=is_token, other=0.0)  # [rows]
    beats = routed[None, :] & ((scores > mine[:, None]) | ((scores == mine[:, None]) & (experts[None, :] < expert)))
    rank = tl.sum(beats.to(tl.int32), axis=1)  # [rows] routed experts ranked above this one
    return (is_token & ((expert < shared) | (rank < routed_active))).to(tl.int32)


@triton.jit
def _up_kernel(
    x_ptr, work_ptr, mask_ptr, w_in_ptr, w_gate_ptr, b_in_ptr,
    n_tokens, n_experts, width, d_model, shared, routed_active,
    ROUTE: tl.constexpr, EXPERT_LANES: tl.constexpr,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    TOKEN_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h_ptr, scores_ptr, use_ptr = _scratch(work_ptr, mask_ptr, n_tokens, n_experts, width, ROUTE)
    expert = tl.program_id(0)
    tokens = tl.arange(0, TOKEN_ROWS)  # [16]
    is_token = tokens < n_tokens
    if ROUTE:
        use = _selects(scores_ptr, expert, tokens, is_token, n_experts, shared, routed_active, EXPERT_LANES)  # [16]
        if tl.program_id(1) == 0:
            tl.store(use_ptr + tokens * n_experts + expert, use.to(tl.float32), mask=is_token)  # for the down kernel
    else:
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
            z = tl.dot(x, tl.trans(w), z, input_precision=PRECISION)
            if GATED:
                g = tl.load(w_gate_ptr + block, mask=in_block, other=0.0).to(tl.float32)
                gate = tl.dot(x, tl.trans(g), gate, input_precision=PRECISION)
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
    work_ptr, mask_ptr, w_out_ptr, b_out_ptr, y_ptr,
    n_tokens, n_experts, width, d_model,
    ROUTE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, EXPERT_LANES: tl.constexpr, TOKEN_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    h_ptr, _, use_ptr = _scratch(work_ptr, mask_ptr, n_tokens, n_experts, width, ROUTE)
    tokens = tl.arange(0, TOKEN_ROWS)
    is_token = tokens < n_tokens
    experts = tl.arange(0, EXPERT_LANES)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD] output coordinates
    use = tl.load(use_ptr + tokens[:, None] * n_experts + experts[None, :],
                  mask=is_token[:, None] & (experts[None, :] < n_experts), other=0).to(tl.int32)  # [16, EL]
    in_union = tl.max(use, axis=0)  # [EL] 1 where any token selected the expert
    slot = tl.cumsum(in_union, axis=0) - 1  # [EL] place of each union expert among them, in index order
    acc = tl.zeros((TOKEN_ROWS, BLOCK_D), dtype=tl.float32)
    blocks = tl.cdiv(width, BLOCK_M)  # neuron blocks per expert
    for i in range(tl.sum(in_union, axis=0) * blocks):  # one software pipeline across the union's experts
        expert = tl.max(tl.where((in_union > 0) & (slot == i // blocks), experts, 0), axis=0)  # of the union's (i // blocks)-th expert
        neurons = (i % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        h = tl.load(h_ptr + tokens[:, None] * n_experts * width + expert * width + neurons[None, :],
                    mask=is_token[:, None] & (neurons[None, :] < width), other=0.0)  # [16, BM]
        w = tl.load(w_out_ptr + expert.to(tl.int64) * d_model * width + cols[:, None] * width + neurons[None, :],
                    mask=(cols[:, None] < d_model) & (neurons[None, :] < width), other=0.0).to(tl.float32)  # [BD, BM]
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)  # [16, BD]
    if HAS_BIAS:
        acc += tl.load(b_out_ptr + cols, mask=cols < d_model, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + tokens[:, None] * d_model + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=is_token[:, None] & (cols[None, :] < d_model))


_INTERPRETED = not isinstance(_up_kernel, triton.JITFunction)  # under TRITON_INTERPRET=1: the kernels run on CPU tensors through numpy


@dataclass(frozen=True)
class Tiling:
    """Block sizes and launch options of the up and down kernels (powers of two ≥ 16);
    benchmarks/moe_kernels.py --tune measures them on a GPU."""

    up_block: tuple[int, int] = (32, 128)  # (BLOCK_M neurons, BLOCK_D inputs) of the up kernel
    down_block: tuple[int, int] = (32, 128)  # (BLOCK_D outputs, BLOCK_M neurons) of the down kernel
    num_warps: int = 4
    num_stages: int = 3  # weight blocks in flight per program: the software pipeline's depth


DEFAULT_TILING = Tiling()


@dataclass(frozen=True)
class Launch:
    """One kernel launch: kernel[grid](**arguments(tensors)). Everything but the tensors is fixed by the layer's shape,
    the token count and the tiling, so a decode call reuses its launches and only binds this call's tensors."""

    kernel: triton.JITFunction
    grid: tuple[int, ...]
    constants: dict  # sizes, flags, block sizes and launch options (num_warps, num_stages)
    tensors: dict[str, str]  # kernel argument → name of its tensor: a weight (MoEFFN.weights()) or a call buffer (x, work, mask, y)

    def arguments(self, tensors: Mapping[str, torch.Tensor]) -> dict:
        return {**self.constants, **{argument: tensors[name] for argument, name in self.tensors.items()}}


def decode_output(ffn: MoEFFN, tokens: torch.Tensor, mask: torch.Tensor | None = None, tiling: Tiling | None = None) -> torch.Tensor:
    """y = Σ_e mask[t, e] · y_e(x_t) + b_out in the tokens' dtype, for at most MAX_TOKENS tokens.

    tokens: [T, d], mask: bool [T, E], or None for the router's own selection → y: [T, d]
    tiling: None → the layer's `ffn.decode_tiling`, or DEFAULT_TILING where that is None too
    This runs once per layer per generated token, so the host work is kept to binding tensors to cached launches.
    """
    n_tokens = tokens.shape[0]
    if n_tokens > MAX_TOKENS:
        raise MetanetError(f"the decode kernel takes at most {MAX_TOKENS} tokens, got {n_tokens}")
    tensors = call_tensors(ffn, tokens.contiguous(), mask)
    if _INTERPRETED:  # the interpreter reads tensors through numpy, which refuses autograd history
        tensors = {name: None if t is None else t.detach() for name, t in tensors.items()}
    for launch in launches(ffn, n_tokens, mask is None, tiling or ffn.decode_tiling or DEFAULT_TILING):
        launch.kernel[launch.grid](**launch.arguments(tensors))
    return tensors["y"]


def call_tensors(ffn: MoEFFN, x: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The tensors of one decode call by the names of Launch.tensors: the weights, x [T, d] (contiguous), y [T, d]
    in x's dtype, `work` (float32: H [T, E, m], then when routing the scores [T, E] and the selection [T, E]; see
    _scratch) and `mask` (the given bool mask's bytes, no copy; `work` when routing: unused). Allocated on x's device."""
    weights = ffn.weights()
    n_experts, width, _ = weights["w_in"].shape
    n_tokens, d = x.shape
    route = mask is None
    work = x.new_empty(n_tokens * n_experts * (width + 2 if route else width), dtype=torch.float32)
    return {**weights, "x": x, "y": x.new_empty((n_tokens, d)), "work": work, "mask": work if route else mask.contiguous().view(torch.uint8)}


def launches(ffn: MoEFFN, n_tokens: int, route: bool, tiling: Tiling) -> tuple[Launch, ...]:
    """The launches of one decode call of `ffn` on n_tokens tokens (route: the kernels select the experts, else the
    mask given does), for decode_output and for compiling them ahead of time (benchmarks/decode_sass.py)."""
    weights = ffn.weights()
    w_in = weights["w_in"]
    return _launches(n_tokens, route, tiling, *w_in.shape, w_in.dtype, weights["w_gate"] is not None, weights["b_in"] is not None,
                     weights["b_out"] is not None, ffn.point.shared, ffn.point.routed_active, ffn.activation)


@cache
def _launches(
    n_tokens: int, route: bool, tiling: Tiling, n_experts: int, width: int, d: int, weight_dtype: torch.dtype,
    gated: bool, has_b_in: bool, has_b_out: bool, shared: int, routed_active: int, activation: str,
) -> tuple[Launch, ...]:
    """launches() for a layer given by its shape and kind (hashable, so each combination is built once)."""
    shape = {"n_tokens": n_tokens, "n_experts": n_experts, "width": width, "d_model": d}
    lanes = max(16, triton.next_power_of_2(n_experts))
    options = {"num_warps": tiling.num_warps, "num_stages": tiling.num_stages}
    precision = "ieee" if weight_dtype == torch.float32 else "tf32"  # float32 weights: products as exact as the torch paths
    token_lanes = triton.next_power_of_2(n_tokens)
    calls = [] if not route else [Launch(_score_kernel, (n_experts,), {
        **shape, "TOKEN_LANES": token_lanes, "BLOCK_D": min(SCORE_ELEMENTS // token_lanes, triton.next_power_of_2(d)), "num_warps": SCORE_WARPS,
    }, {"x_ptr": "x", "router_weight_ptr": "router_weight", "router_bias_ptr": "router_bias", "work_ptr": "work"})]
    block_m, block_d = tiling.up_block
    calls.append(Launch(_up_kernel, (n_experts, triton.cdiv(width, block_m)), {
        **shape, "shared": shared, "routed_active": routed_active,
        "ROUTE": route, "EXPERT_LANES": lanes, "ACTIVATION": activation, "GATED": gated, "HAS_BIAS": has_b_in,
        "PRECISION": precision, "TOKEN_ROWS": _TOKEN_ROWS, "BLOCK_M": block_m, "BLOCK_D": block_d, **options,
    }, {"x_ptr": "x", "work_ptr": "work", "mask_ptr": "mask", "w_in_ptr": "w_in",
        "w_gate_ptr": "w_gate" if gated else "w_in", "b_in_ptr": "b_in" if has_b_in else "w_in"}))  # unused pointers: any tensor
    block_d, block_m = tiling.down_block
    calls.append(Launch(_down_kernel, (triton.cdiv(d, block_d),), {
        **shape, "ROUTE": route, "HAS_BIAS": has_b_out, "PRECISION": precision, "EXPERT_LANES": lanes, "TOKEN_ROWS": _TOKEN_ROWS,
        "BLOCK_D": block_d, "BLOCK_M": block_m, **options,
    }, {"work_ptr": "work", "mask_ptr": "mask", "w_out_ptr": "w_out", "b_out_ptr": "b_out" if has_b_out else "w_out", "y_ptr": "y"}))
    return tuple(calls)

