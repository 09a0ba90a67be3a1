"""Compensation: refit what the active experts write, once routing is fixed.

A carved block drops the neurons of the experts a token skips. With the routing fixed, the
block's output is linear in the down projection, so the down projection (and an output bias)
can be refitted to make the carved block match the dense one on calibration inputs X [T, d]:

    Â = a(X) ⊙ M[:, assign]                  masked hidden activations   [T, f]
                                              (a = layer.hidden, M [T, E] the routing mask)
    min_{W, b}  ‖Â Wᵀ + 1 bᵀ − Y‖²_F + λ ‖W − W₀‖²_F          Y = layer.forward(X)   [T, d]

with W₀ = layer.w_out, λ = ridge · mean diag(ÂᵀÂ) (a pull toward the dense weights: what the
calibration text does not show stays as it was) and b unpenalised. With D = [Â 1] and
Θ = [W b]ᵀ the normal equations are (DᵀD + Λ) Θ = DᵀY + Λ Θ₀, solved in float64 from DᵀD and
DᵀY accumulated over token batches (memory (f+1)² doubles, not T·f).
A neuron no calibration token activates keeps its dense column. Expert e then writes
W[:, members of e] · a; the bias b is added to every token (it absorbs the mean of what the
skipped experts would have written).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metanet.checkpoints import FFNLayer

#: Ridge λ relative to the mean diagonal of ÂᵀÂ: measured on SmolLM2 (real-llm.md), 0.1 keeps most of the
#: in-domain gain of a plain fit (1e-3) and loses far less on text of another domain.
DEFAULT_RIDGE = 0.1


@dataclass
class DownProjection:
    """A refitted down projection in the source layer's neuron order."""

    w_out: torch.Tensor  # [d, f] float32
    b_out: torch.Tensor | None  # [d] float32, None when fitted without a bias


def refit_down_projection(layer: FFNLayer, x: torch.Tensor, assign: torch.Tensor, mask: torch.Tensor,
                          ridge: float = DEFAULT_RIDGE, bias: bool = True, batch_tokens: int = 2048) -> DownProjection:
    """The least-squares down projection of the module docstring.

    x: [T, d] calibration FFN inputs, assign: [f] expert of each neuron, mask: bool [T, E] the experts each token runs.
    `bias` False fits W alone (the layer's own b_out, if any, kept as it is).
    """
    f, d = layer.d_ff, layer.d_model
    columns = f + (1 if bias else 0)
    gram = torch.zeros(columns, columns, dtype=torch.float64, device=x.device)  # DᵀD
    cross = torch.zeros(columns, d, dtype=torch.float64, device=x.device)  # DᵀY
    with torch.no_grad():
        for xb, mb in zip(x.split(batch_tokens), mask.split(batch_tokens)):
            hidden = layer.hidden(xb)  # [t, f]
            target = torch.nn.functional.linear(hidden, layer.w_out, layer.b_out).double()  # [t, d]
            design = (hidden * mb[:, assign]).double()  # [t, f]
            if bias:
                design = torch.cat([design, torch.ones(design.shape[0], 1, dtype=torch.float64, device=x.device)], dim=1)
            elif layer.b_out is not None:
                target = target - layer.b_out.double()
            gram += design.T @ design
            cross += design.T @ target
        weight = ridge * gram.diagonal()[:f].mean().clamp(min=1e-30)
        penalty = torch.zeros(columns, dtype=torch.float64, device=x.device)
        penalty[:f] = weight
        penalty[f:] = weight * 1e-9  # keeps the system definite; the bias is in effect unpenalised
        prior = torch.zeros(columns, d, dtype=torch.float64, device=x.device)
        prior[:f] = layer.w_out.T.double()
        theta = torch.linalg.solve(gram + torch.diag(penalty), cross + penalty[:, None] * prior)  # [columns, d]
    w_out = theta[:f].T.float().contiguous()
    b_out = theta[f].float().contiguous() if bias else (None if layer.b_out is None else layer.b_out.clone())
    return DownProjection(w_out, b_out)
