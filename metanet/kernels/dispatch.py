"""Which runtime path an MoEFFN call takes, and running it.

    autograd needed, or not on CUDA     → reference   (differentiable, any device)
    T ≤ 4 tokens                        → decode      (Triton; grouped when Triton is missing)
    T ≤ DENSE_MAX_TOKENS and the union
    of selected experts ≥ DENSE_MIN_UNION of E → dense (bandwidth-bound: read every weight once, as dense does)
    otherwise                           → grouped     (k/E of the dense FLOPs)

The thresholds are the crossover points of benchmarks/moe_kernels.py (`--paths` times
every path at every T); the decode choice needs no host synchronisation.
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
DECODE_MAX_TOKENS = 4
DENSE_MAX_TOKENS = 128
DENSE_MIN_UNION = 0.75


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_path(ffn: MoEFFN, tokens: torch.Tensor, mask: torch.Tensor) -> str:
    """The path for this call (module docstring).   tokens: [T, d], mask: bool [T, E]"""
    needs_grad = torch.is_grad_enabled() and (tokens.requires_grad or any(p.requires_grad for p in ffn.parameters()))
    if needs_grad or tokens.device.type != "cuda":
        return "reference"
    return cuda_path(tokens.shape[0], lambda: mask.any(0).float().mean().item())


def cuda_path(n_tokens: int, union_fraction: Callable[[], float]) -> str:
    """The CUDA path for T = n_tokens; union_fraction() = share of experts any token selected (asked only if needed: it syncs)."""
    if n_tokens <= DECODE_MAX_TOKENS:
        return "decode" if triton_available() else "grouped"
    if n_tokens <= DENSE_MAX_TOKENS and union_fraction() >= DENSE_MIN_UNION:
        return "dense"
    return "grouped"


def expert_sum(ffn: MoEFFN, tokens: torch.Tensor, mask: torch.Tensor, path: str = "auto") -> torch.Tensor:
    """Σ_e mask[t, e] · y_e(x_t) by `path` ("auto" chooses).   tokens: [T, d], mask: bool [T, E] → float32 [T, d]"""
    if path == "auto":
        path = choose_path(ffn, tokens, mask)
    if path == "reference":
        from metanet.kernels.reference import reference_sum as run
    elif path == "grouped":
        from metanet.kernels.grouped import grouped_sum as run
    elif path == "dense":
        from metanet.kernels.dense import dense_sum as run
    elif path == "decode":
        if not triton_available():
            raise MetanetError("the decode path needs Triton (pip install triton)")
        from metanet.kernels.decode import decode_sum as run
    else:
        raise MetanetError(f"unknown MoE kernel path {path!r}; known: auto, {', '.join(PATHS)}")
    return run(ffn, tokens, mask)
