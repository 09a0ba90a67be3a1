"""Differentiable relaxations used to train the metanetwork; all are label-invariant.

Soft balanced assignment (Sinkhorn): with unit cluster embeddings z [f, D] and centroids
c [K, D], P = argmin ⟨P, −z cᵀ⟩/τ − H(P) subject to P·1 = 1 (each neuron is spread over
experts) and Pᵀ·1 = m (each expert holds m neurons); c is refined by soft k-means steps
c_e ∝ Σ_j P_je z_j from the same farthest-point start as the hard prediction.

Losses (experts can be relabelled freely: every loss is invariant to permuting P's columns):
    co_membership_loss   ‖P Pᵀ − T Tᵀ‖²_F / f², T the one-hot teacher assignment, computed as
                         (‖PᵀP‖² − 2‖PᵀT‖² + ‖TᵀT‖²) / f² without any f × f matrix.
    reconstruction_loss  ‖Y − Y_moe‖² / ‖Y‖² on calibration inputs, where the router of expert e
                         is the α-weighted mean of its soft members' input rows and a token keeps
                         expert e with weight σ((s_e(x) − θ(x)) / τ_r), θ(x) halfway between its
                         k-th and (k+1)-th largest score (a soft top-k).
"""

from __future__ import annotations

import torch

from metanet.checkpoints import FFNLayer
from metanet.partition.balanced import _farthest_points


def sinkhorn(logits: torch.Tensor, capacity: float, iters: int = 30) -> torch.Tensor:
    """Balanced soft assignment in the log domain.   logits: [f, K] → P [f, K], rows sum to 1, columns to `capacity`."""
    log_p = logits
    log_capacity = torch.log(torch.tensor(capacity, dtype=logits.dtype))
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + log_capacity  # columns → capacity
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)  # rows → 1
    return log_p.exp()


def soft_partition(z: torch.Tensor, k: int, capacity: int, tau: float = 0.1, kmeans_steps: int = 3) -> torch.Tensor:
    """P [f, K] from unit embeddings z [f, D]: farthest-point start, then soft balanced k-means steps."""
    with torch.no_grad():
        start = _farthest_points(z.detach().double(), k)
    centroids = z[start]
    for _ in range(kmeans_steps):
        p = sinkhorn(z @ centroids.T / tau, capacity)
        centroids = torch.nn.functional.normalize(p.T @ z, dim=1)
    return sinkhorn(z @ centroids.T / tau, capacity)


def co_membership_loss(p: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """‖P Pᵀ − T Tᵀ‖²_F / f².   p: [f, K], teacher: [f] int64 expert ids (any labels)."""
    t = torch.nn.functional.one_hot(teacher).to(p.dtype)  # [f, K']
    f = p.shape[0]
    return ((p.T @ p).pow(2).sum() - 2 * (p.T @ t).pow(2).sum() + (t.T @ t).pow(2).sum()) / f**2


def soft_router(layer: FFNLayer, p: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W = (P ⊙ α)ᵀ w_in / (Pᵀα), b likewise with b_in.   → ([K, d], [K])"""
    weights = p * alpha[:, None]  # [f, K]
    totals = weights.sum(0).clamp(min=1e-12)  # [K]
    w = weights.T @ layer.w_in / totals[:, None]
    b = (weights.T @ layer.b_in) / totals if layer.b_in is not None else torch.zeros_like(totals)
    return w, b


def soft_top_k(scores: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """σ((s − θ)/τ) with θ halfway between each row's k-th and (k+1)-th largest score; all ones when k = K.   [T, K] → [T, K]"""
    if k >= scores.shape[1]:
        return torch.ones_like(scores)
    top = scores.detach().topk(k + 1, dim=1).values  # [T, k+1]
    threshold = (top[:, k - 1] + top[:, k]) / 2
    return torch.sigmoid((scores - threshold[:, None]) / tau)


def reconstruction_loss(layer: FFNLayer, x: torch.Tensor, p: torch.Tensor, alpha: torch.Tensor, k: int, tau: float = 0.1) -> torch.Tensor:
    """‖Y − Y_moe‖² / ‖Y‖² with the soft router and soft top-k.   x: [T, d], p: [f, K], alpha: [f]"""
    w, b = soft_router(layer, p, alpha)
    gates = soft_top_k(x @ w.T + b, k, tau)  # [T, K]
    a = layer.hidden(x)  # [T, f]
    y = torch.nn.functional.linear(a, layer.w_out, layer.b_out)
    y_moe = torch.nn.functional.linear(a * (gates @ p.T), layer.w_out, layer.b_out)
    return (y - y_moe).pow(2).sum() / y.pow(2).sum()
