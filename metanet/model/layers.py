"""Message passing between hidden-neuron and residual nodes over weight-valued edges.

With hidden states h [f, w], residual states r [d, w] and edge channels E [C, f, d]:

    m_j = (1/d) Σ_c Σ_i E_c[j, i] · U_c r_i           (residual → hidden, a dense product E_c · R U_cᵀ)
    h_j ← h_j + MLP_h([LN(h_j), m_j, mean_j' h_j'])
    n_i = (1/f) Σ_c Σ_j E_c[j, i] · V_c h_j           (hidden → residual, E_cᵀ · H V_cᵀ)
    r_i ← r_i + MLP_r([LN(r_i), n_i, mean_i' r_i'])

Sums over the other side's nodes divided by their number make the layer independent of d
and f; every operation is per node or a symmetric aggregation, so permuting hidden
neurons (or residual coordinates) permutes h (or r) and leaves the other side unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(inputs: int, width: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.GELU(), nn.Linear(width, outputs))


class BipartiteLayer(nn.Module):
    def __init__(self, width: int, edge_channels: int):
        super().__init__()
        self.width, self.channels = width, edge_channels
        self.to_hidden = nn.Linear(width, width * edge_channels, bias=False)  # U_c stacked
        self.to_residual = nn.Linear(width, width * edge_channels, bias=False)  # V_c stacked
        self.hidden_norm, self.residual_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.hidden_update = mlp(3 * width, 2 * width, width)
        self.residual_update = mlp(3 * width, 2 * width, width)

    def forward(self, h: torch.Tensor, r: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [f, w], r: [d, w], edges: [C, f, d] → (h', r')"""
        (f, w), d = h.shape, r.shape[0]
        u = self.to_hidden(r).view(d, self.channels, w).transpose(0, 1)  # [C, d, w]
        m = torch.bmm(edges, u).sum(0) / d  # [f, w]
        h = h + self.hidden_update(torch.cat([self.hidden_norm(h), m, h.mean(0).expand(f, w)], dim=1))
        v = self.to_residual(h).view(f, self.channels, w).transpose(0, 1)  # [C, f, w]
        n = torch.bmm(edges.transpose(1, 2), v).sum(0) / f  # [d, w]
        r = r + self.residual_update(torch.cat([self.residual_norm(r), n, r.mean(0).expand(d, w)], dim=1))
        return h, r
