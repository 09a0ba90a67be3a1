"""Grouped path: tokens sorted by expert, one grouped GEMM per projection (prefill and batches).

The mask's (token, expert) pairs are listed in expert order, p = (t_p, e_p), so each
expert's pairs form one contiguous segment. With X = x[t_p] stacked ([N, d], N = Σ mask):

    H = act(X · W_in[e_p]ᵀ + b_in[e_p]) ⊙ (X · W_gate[e_p]ᵀ)      [N, m]
    O = H · W_out[e_p]ᵀ                                          [N, d]
    y[t] = Σ_{p: t_p = t} O[p]                                   (index_add in float32)

Each projection is one `torch._grouped_mm` call where it applies (bf16 on CUDA sm80+,
bf16/float32 on CPU from torch 2.9, 16-byte aligned rows), otherwise one matmul per expert segment.
FLOPs are those of the selected experts only: k/E of the dense FFN's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from metanet.checkpoints import ACTIVATIONS

if TYPE_CHECKING:
    from metanet.moe.module import MoEFFN

_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])  # (major, minor)


def grouped_sum(ffn: MoEFFN, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_e mask[t, e] · y_e(x_t) over expert-sorted tokens.   tokens: [T, d], mask: bool [T, E] → float32 [T, d]"""
    y = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    experts, rows = mask.T.nonzero(as_tuple=True)  # [N] each: pairs in expert order, tokens increasing within an expert
    if rows.numel() == 0:
        return y
    counts = mask.sum(0)  # [E] segment sizes
    x = tokens[rows]  # [N, d]
    z = grouped_matmul(x, ffn.w_in, counts)  # [N, m]
    if ffn.b_in is not None:
        z = z + ffn.b_in[experts]
    h = ACTIVATIONS[ffn.activation](z)
    if ffn.w_gate is not None:
        h = h * grouped_matmul(x, ffn.w_gate, counts)
    out = grouped_matmul(h, ffn.w_out, counts)  # [N, d]
    return y.index_add_(0, rows, out.float())


def grouped_matmul(a: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Z[p] = a[p] · w[e]ᵀ for the rows p of segment e.   a: [N, K], w: [E, n, K], counts: [E] with Σ = N → [N, n]"""
    if _grouped_mm_applies(a, w):
        offsets = counts.cumsum(0).to(torch.int32)  # end of each segment
        return torch._grouped_mm(a, w.transpose(1, 2), offs=offsets)  # w[e]ᵀ: [K, n], column-major
    segments = a.split(counts.tolist())
    return torch.cat([segment @ w[e].T for e, segment in enumerate(segments)])


def _grouped_mm_applies(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands: its dtypes, devices and 16-byte row alignment."""
    if not hasattr(torch, "_grouped_mm") or a.dtype != w.dtype or not a.is_contiguous() or not w.is_contiguous():
        return False
    if a.device.type == "cuda":
        dtype_ok = a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (8, 0)
    else:  # torch 2.9 added the CPU implementation
        dtype_ok = a.device.type == "cpu" and a.dtype in (torch.bfloat16, torch.float32) and _TORCH_VERSION >= (2, 9)
    alignment = 16 // a.element_size()  # elements per 16 bytes
    return dtype_ok and a.shape[1] % alignment == 0 and w.shape[1] % alignment == 0
