"""Which runtime path an MoEFFN call takes, and running it.

    autograd needed                     → reference   (differentiable, any device)
    not on CUDA                         → grouped     (on CPU: less overhead than reference at small T, about its speed at large T)
    T ≤ DECODE_MAX_TOKENS and Triton    → decode      (reads the union of the tokens' experts)
    inside CUDA-graph capture           → dense       (the union test and the grouped sort both synchronise)
    T ≤ DENSE_MAX_TOKENS and the union
    of selected experts ≥ DENSE_MIN_UNION of E → dense (bandwidth-bound: read every weight once, as dense does)
    otherwise                           → grouped     (k/E of the dense FLOPs)

Nothing up to DECODE_MAX_TOKENS synchronises with the host, so a serving stack's decode step over a
batch of up to 16 sequences can be captured in a CUDA graph. Up to there the path is the same in and
out of capture, so a warm-up call compiles the Triton kernels that the capture then records; larger T
take the dense path in capture, plain torch, which needs no compiling.

The CUDA thresholds are placeholders until benchmarks/moe_kernels.py --paths has run on a
GPU: it times every path at every T, and they belong at the crossovers it shows.
Choosing decode needs no host synchronisation, and decode routes inside its own kernels.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from typing import TYPE_CHECKING, Callable

import torch

from metanet.errors import MetanetError

if TYPE_CHECKING:
    from metanet.moe.module import MoEFFN

PATHS = ("reference", "decode", "grouped", "dense")
DECODE_MAX_TOKENS = 16  # most tokens one decode call takes (the token rows of its block products), and where it is chosen
#: The dense path's down projection writes and reads E partial sums [E, T, d] besides the weights: for a
#: 4096×14336 layer at E = 16 that is 4.8% more bytes at T = 64, beyond which it could not stay within 5% of dense.
DENSE_MAX_TOKENS = 64
DENSE_MIN_UNION = 0.75


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_path(ffn: MoEFFN, tokens: torch.Tensor, mask: Callable[[], torch.Tensor]) -> str:
    """The path for this call (module docstring).   tokens: [T, d]; mask() → bool [T, E], asked only if needed"""
    needs_grad = torch.is_grad_enabled() and (tokens.requires_grad or any(p.requires_grad for p in ffn.parameters()))
    if needs_grad:
        return "reference"
    if tokens.device.type != "cuda":
        return "grouped"
    return cuda_path(tokens.shape[0], lambda: mask().any(0).float().mean().item(), torch.cuda.is_current_stream_capturing())


def cuda_path(n_tokens: int, union_fraction: Callable[[], float], capturing: bool = False) -> str:
    """The CUDA path for T = n_tokens; union_fraction() = share of experts any token selected (asked only if needed: it syncs);
    capturing: inside CUDA-graph capture, where nothing may synchronise."""
    if n_tokens <= DECODE_MAX_TOKENS and triton_available():
        return "decode"
    if capturing:
        return "dense"
    if n_tokens <= DENSE_MAX_TOKENS and union_fraction() >= DENSE_MIN_UNION:
        return "dense"
    return "grouped"


def moe_output(ffn: MoEFFN, tokens: torch.Tensor, mask: torch.Tensor | None = None, path: str = "auto") -> torch.Tensor:
    """y = Σ_e mask[t, e] · y_e(x_t) + b_out in the tokens' dtype, by `path` ("auto" chooses).

    tokens: [T, d]; mask: bool [T, E], or None for the router's selection (`ffn.route`) → y: [T, d]
    The torch paths return float32 sums that are finished here; decode finishes in its kernel.
    """
    chosen = mask

    def selection() -> torch.Tensor:  # the router runs at most once, and only if asked (decode routes in its kernels)
        nonlocal chosen
        if chosen is None:
            chosen = ffn.route(tokens)
        return chosen

    if path == "auto":
        path = choose_path(ffn, tokens, selection)
    if path == "decode":
        if not triton_available():
            raise MetanetError("the decode path needs Triton (pip install triton)")
        from metanet.kernels.decode import decode_output

        return decode_output(ffn, tokens, mask)
    if path == "reference":
        from metanet.kernels.reference import reference_sum as expert_sum
    elif path == "grouped":
        from metanet.kernels.grouped import grouped_sum as expert_sum
    elif path == "dense":
        from metanet.kernels.dense import dense_sum as expert_sum
    else:
        raise MetanetError(f"unknown MoE kernel path {path!r}; known: auto, {', '.join(PATHS)}")
    y = expert_sum(ffn, tokens, selection())  # float32 [T, d]
    if ffn.b_out is not None:
        y = y + ffn.b_out.float()
    return y.to(tokens.dtype)
