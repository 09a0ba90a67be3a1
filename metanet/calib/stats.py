"""Per-neuron statistics of one FFN layer on calibration inputs X.

With a = layer.hidden(x) (the hidden activations, gate included), neuron j is *active*
on a token when
    ReLU layers (layer.activation == "relu"):  a_j ≠ 0   (a_j > 0 for an ungated ReLU;
                                               with a gate the sign follows the gate)
    smooth layers (gelu, gelu_tanh, silu):     |a_j| is among the token's k largest |a|,
                                               k = max(1, round(active_fraction · f)),
                                               ties broken arbitrarily (torch.topk).
From the boolean mask M [T, f] of active neurons:
    activation_rate_j = Σ_t M_tj / T          mean_abs_j = Σ_t |a_tj| / T
    C[i, j]           = Σ_t M_ti · M_tj       (co-activation counts, C = Mᵀ M)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from metanet.checkpoints import FFNLayer
from metanet.errors import MetanetError

log = logging.getLogger(__name__)

#: Above this many neurons the f×f co-activation matrix is never materialised: it is
#: built DENSE_COACTIVATION_LIMIT² entries (rows × f) at a time and each neuron keeps
#: only its `keep` most frequent partners (plus its diagonal). 4096² float64 = 128 MiB.
DENSE_COACTIVATION_LIMIT = 4096


@dataclass
class NeuronStats:
    activation_rate: torch.Tensor  # [f] share of tokens on which neuron j is active
    mean_abs: torch.Tensor  # [f] mean |a_j| over tokens
    coactivation: torch.Tensor  # [f, f] sparse COO (coalesced) float32 counts C[i, j]; exact, or top-`keep` sketch
    n_tokens: int

    def to(self, device: torch.device | str) -> NeuronStats:
        """The same statistics on `device`."""
        return NeuronStats(self.activation_rate.to(device), self.mean_abs.to(device), self.coactivation.to(device), self.n_tokens)


def neuron_stats(layer: FFNLayer, x: torch.Tensor, active_fraction: float = 0.25, batch_tokens: int = 1024, keep: int = 64) -> NeuronStats:
    """Statistics of `layer` on FFN inputs x [T, d] (see the module docstring for "active").

    Activations are computed batch_tokens tokens at a time; the active mask is kept as bool
    [T, f] (T·f bytes). Co-activation:
      f ≤ DENSE_COACTIVATION_LIMIT: every non-zero C[i, j] exactly.
      f >  DENSE_COACTIVATION_LIMIT: a sketch. Row i keeps C[i, i] and its `keep` largest
        off-diagonal counts (ties broken arbitrarily); the kept set is then symmetrised (an
        entry kept by row i or by row j is stored at both (i, j) and (j, i)), so every stored
        value is the exact count and absent entries are 0 or below the rows' top `keep`.
    Counts are float32, exact up to 2²⁴ tokens.
    """
    if x.ndim != 2 or x.shape[1] != layer.d_model or x.shape[0] == 0:
        raise MetanetError(f"FFN inputs must be [T, {layer.d_model}] with T > 0 for layer {layer.index}, got {list(x.shape)}")
    if not 0 < active_fraction <= 1:
        raise MetanetError(f"active_fraction must be in (0, 1], got {active_fraction}")
    if keep < 1 or batch_tokens < 1:
        raise MetanetError(f"keep and batch_tokens must be positive, got keep={keep}, batch_tokens={batch_tokens}")
    n_tokens, f = x.shape[0], layer.d_ff
    active = torch.empty(n_tokens, f, dtype=torch.bool, device=x.device)  # M [T, f]
    abs_sum = torch.zeros(f, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for start in range(0, n_tokens, batch_tokens):
            a = layer.hidden(x[start : start + batch_tokens])  # [b, f]
            abs_sum += a.abs().sum(0, dtype=torch.float64)
            active[start : start + a.shape[0]] = active_mask(layer, a, active_fraction)
        counts = active.sum(0, dtype=torch.float64)  # [f]
        coactivation = _coactivation(active, batch_tokens, keep)
    log.debug("layer %d: mean activation rate %.3f on %d tokens", layer.index, counts.mean().item() / n_tokens, n_tokens)
    return NeuronStats(
        activation_rate=(counts / n_tokens).float(),
        mean_abs=(abs_sum / n_tokens).float(),
        coactivation=coactivation,
        n_tokens=n_tokens,
    )


def active_mask(layer: FFNLayer, a: torch.Tensor, active_fraction: float = 0.25) -> torch.Tensor:
    """Which neurons are active on each token (module docstring).   a: [T, f] hidden activations → bool [T, f]"""
    if layer.activation == "relu":
        return a != 0
    k = max(1, round(active_fraction * a.shape[1]))
    return torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.abs().topk(k, dim=1).indices, True)


def _coactivation(active: torch.Tensor, batch_tokens: int, keep: int) -> torch.Tensor:
    """C = Mᵀ M as a coalesced sparse [f, f] tensor, row block by row block (see neuron_stats)."""
    n_tokens, f = active.shape
    sketch = f > DENSE_COACTIVATION_LIMIT
    rows_per_block = max(1, DENSE_COACTIVATION_LIMIT**2 // f)
    indices, values = [], []
    for r0 in range(0, f, rows_per_block):
        r1 = min(r0 + rows_per_block, f)
        block = torch.zeros(r1 - r0, f, dtype=torch.float64, device=active.device)  # C[r0:r1, :]
        for t0 in range(0, n_tokens, batch_tokens):
            m = active[t0 : t0 + batch_tokens].float()  # [b, f]
            block += (m[:, r0:r1].T @ m).double()  # [r, f], exact: b < 2²⁴
        rows = torch.arange(r0, r1, device=active.device)
        if sketch:
            diagonal = block[rows - r0, rows].clone()  # [r]
            block[rows - r0, rows] = -1.0  # exclude self from the partners
            top = block.topk(min(keep, f - 1), dim=1)  # [r, keep]
            row_ids = torch.cat([rows, rows.repeat_interleave(top.indices.shape[1])])
            col_ids = torch.cat([rows, top.indices.reshape(-1)])
            vals = torch.cat([diagonal, top.values.reshape(-1)])
        else:
            row_ids, col_ids = block.nonzero(as_tuple=True)
            vals = block[row_ids, col_ids]
            row_ids = row_ids + r0
        nonzero = vals > 0
        indices.append(torch.stack([row_ids[nonzero], col_ids[nonzero]]))
        values.append(vals[nonzero])
    index, value = torch.cat(indices, dim=1), torch.cat(values)
    if sketch:  # symmetrise: the union of (i, j) and (j, i); C is symmetric so both carry the same count
        linear = torch.cat([index[0] * f + index[1], index[1] * f + index[0]])
        unique, inverse = linear.unique(return_inverse=True)
        value = torch.zeros(unique.shape[0], dtype=value.dtype, device=value.device).scatter_(0, inverse, value.repeat(2))
        index = torch.stack([unique // f, unique % f])
    return torch.sparse_coo_tensor(index, value.float(), (f, f), check_invariants=False).coalesce()
