"""Differentiable relaxations used to train the metanetwork; all are label-invariant.

Soft balanced assignment (Sinkhorn): with unit rows z [f, D] of the clustering space and centroids
c [K, D], P = argmin ⟨P, −z cᵀ⟩/τ − H(P) subject to P·1 = 1 (each neuron is spread over
experts) and Pᵀ·1 = m (each expert holds m neurons); c are the centroids of the hard balanced
k-means clusters the prediction itself would use.

Losses (experts can be relabelled freely: every loss is invariant to permuting P's columns):
    co_membership_loss   ‖P Pᵀ − T Tᵀ‖²_F / f², T the one-hot teacher assignment, computed as
                         (‖PᵀP‖² − 2‖PᵀT‖² + ‖TᵀT‖²) / f² without any f × f matrix.
    reconstruction_loss  ‖Y − Y_moe‖² / ‖Y‖² on calibration inputs, where the router of expert e
                         is `expert_router` over its soft members (least squares of the soft experts'
                         output norms on synthetic inputs) and a token keeps routed expert e
                         with weight σ((s_e(x) − θ(x)) / τ_r), θ(x) halfway between its (k−s)-th and
                         (k−s+1)-th largest routed score (a soft top-k); shared experts always count.
    load_loss            balance of the soft router's load over the routed experts.
With straight_through, partition and gates take the hard values the prediction uses (so the
reconstruction loss is the hard metric on the training tokens) and the soft ones' gradients.
    importance_loss      the importance head against each neuron's measured output mass.
"""

from __future__ import annotations

import math

import torch

from metanet.checkpoints import FFNLayer
from metanet.model.network import NeuronOutputs
from metanet.model.synthetic import synthetic_inputs
from metanet.moe.routing import select_experts
from metanet.partition.balanced import balanced_kmeans, cluster_sums
from metanet.partition.least_squares import least_squares
from metanet.partition.partition import OperatingPoint


def sinkhorn(logits: torch.Tensor, capacity: float, iters: int = 30) -> torch.Tensor:
    """Balanced soft assignment in the log domain.   logits: [f, K] → P [f, K], rows sum to 1, columns to `capacity`."""
    log_p = logits
    log_capacity = math.log(capacity)
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + log_capacity  # columns → capacity
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)  # rows → 1
    return log_p.exp()


def soft_partition(z: torch.Tensor, k: int, capacity: int, tau: float = 0.1, iters: int = 25, straight_through: bool = False) -> torch.Tensor:
    """P [f, K] from unit rows z [f, D] (the clustering space): the hard prediction's balanced k-means
    (no gradient) gives the clusters; their centroids in z (with gradient) give P = sinkhorn(z cᵀ / τ),
    so the relaxation is centred on exactly the partition `MetaNetwork.predict` would return.
    straight_through: the value is that hard one-hot partition, the gradient the soft P's."""
    with torch.no_grad():
        hard = balanced_kmeans(z.detach(), k, capacity, iters=iters, init="farthest", dtype=torch.float32)
    centroids = torch.nn.functional.normalize(cluster_sums(z, hard, k), dim=1)
    p = sinkhorn(z @ centroids.T / tau, capacity)
    return _straight_through(torch.nn.functional.one_hot(hard, k).to(p.dtype), p) if straight_through else p


def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """The value of `hard` with the gradient of `soft`."""
    return hard + soft - soft.detach()


def co_membership_loss(p: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """‖P Pᵀ − T Tᵀ‖²_F / f².   p: [f, K], teacher: [f] int64 expert ids (any labels)."""
    t = torch.nn.functional.one_hot(teacher).to(p.dtype)  # [f, K']
    f = p.shape[0]
    return ((p.T @ p).pow(2).sum() - 2 * (p.T @ t).pow(2).sum() + (t.T @ t).pow(2).sum()) / f**2


def soft_router(layer: FFNLayer, p: torch.Tensor, out: NeuronOutputs, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`expert_router` with soft membership: least squares of the soft experts' output norms
    ‖Σ_j P_je a_j(x) w_out[:, j]‖ on `n_tokens` synthetic inputs.   p: [f, K] → ([K, d], [K])"""
    x = synthetic_inputs(layer, out.input_scale, out.input_shift, n_tokens)  # [T, d]
    a = layer.hidden(x)  # [T, f]
    norms = torch.stack([torch.nn.functional.linear(a * p[:, e], layer.w_out).norm(dim=1) for e in range(p.shape[1])], dim=1)  # [T, K]
    return least_squares(x, norms)


def soft_top_k(scores: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """σ((s − θ)/(τ·std(s))) with θ halfway between each row's k-th and (k+1)-th largest score and std over
    all scores; all ones when k = K. θ and std take gradients too, so the gates depend only on how the
    scores compare, like the hard top-k: adding a constant to a row or scaling all scores changes
    nothing.   [T, K] → [T, K]"""
    if k >= scores.shape[1]:
        return torch.ones_like(scores)
    top = scores.topk(k + 1, dim=1).values  # [T, k+1]
    threshold = (top[:, k - 1] + top[:, k]) / 2
    return torch.sigmoid((scores - threshold[:, None]) / (tau * scores.std().clamp(min=1e-12)))


def expert_gates(scores: torch.Tensor, point: OperatingPoint, tau: float, straight_through: bool = False) -> torch.Tensor:
    """Soft gates of every expert: shared experts 1, routed ones a soft top-(k − s); straight_through: the value
    of the hard top-k mask (select_experts) with the soft gates' gradient.   [T, E] → [T, E]"""
    shared = torch.ones_like(scores[:, : point.shared])
    gates = torch.cat([shared, soft_top_k(scores[:, point.shared :], point.routed_active, tau)], dim=1)
    return _straight_through(select_experts(scores.detach(), point).to(gates.dtype), gates) if straight_through else gates


def soft_moe(layer: FFNLayer, x: torch.Tensor, p: torch.Tensor, out: NeuronOutputs, point: OperatingPoint, tau: float = 0.1,
             synthetic_tokens: int = 256, straight_through: bool = False):
    """Dense and relaxed MoE outputs with the soft router and soft gates (straight_through: hard top-k values).
    x: [T, d], p: [f, E] (shared experts first) → (Y [T, d], Y_moe [T, d], gates [T, E])"""
    w, b = soft_router(layer, p, out, synthetic_tokens)
    gates = expert_gates(x @ w.T + b, point, tau, straight_through)  # [T, E]
    a = layer.hidden(x)  # [T, f]
    y = torch.nn.functional.linear(a, layer.w_out, layer.b_out)
    y_moe = torch.nn.functional.linear(a * (gates @ p.T), layer.w_out, layer.b_out)
    return y, y_moe, gates


def reconstruction_loss(layer: FFNLayer, x: torch.Tensor, p: torch.Tensor, out: NeuronOutputs, point: OperatingPoint, tau: float = 0.1,
                        synthetic_tokens: int = 256) -> torch.Tensor:
    """‖Y − Y_moe‖² / ‖Y‖² (see soft_moe)."""
    y, y_moe, _ = soft_moe(layer, x, p, out, point, tau, synthetic_tokens)
    return (y - y_moe).pow(2).sum() / y.pow(2).sum()


def load_loss(gates: torch.Tensor, point: OperatingPoint) -> torch.Tensor:
    """Squared coefficient of variation of the routed experts' mean gate over tokens (0 when balanced).   gates: [T, E]"""
    load = gates[:, point.shared :].mean(0)
    return load.var(unbiased=False) / load.mean().pow(2).clamp(min=1e-12)


def importance_loss(importance: torch.Tensor, layer: FFNLayer, x: torch.Tensor) -> torch.Tensor:
    """How far the importance ranks from each neuron's measured output mass t_j = log(mean_T |a_j|·‖w_out[:, j]‖),
    up to a constant: mean_j((i_j − ī) − (t_j − t̄))² / var(t).   importance: [f], x: [T, d]"""
    with torch.no_grad():
        target = (layer.hidden(x).abs().mean(0) * layer.w_out.norm(dim=0)).clamp(min=1e-12).log()
    diff = (importance - importance.mean()) - (target - target.mean())
    return diff.pow(2).mean() / target.var(unbiased=False).clamp(min=1e-12)
