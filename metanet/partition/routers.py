"""Routers: a weight row and bias per expert, scoring  s_e(x) = W_e·x + b_e.

- centroid  W_e = mean of member input rows w_in_j, b_e = mean of member b_in_j.            data-free
- scaled    the same means weighted by each neuron's output scale c_j = ‖w_out[:, j]‖
            (times ‖w_gate_j‖ for gated layers): neurons that write more count more.       data-free
- cmoe      each expert's representative neuron (the member whose activation markers lie
            closest to the expert's mean markers): W_e = w_in_rep, b_e = b_in_rep
            (CMoE's training-free router).                                               calibration
- lsq       least-squares fit of the oracle scores ‖y_e(x)‖ on calibration inputs:
            [X 1]·[W b]ᵀ ≈ S, ridge-regularised.                                        calibration
- mlp       MoEfication's router trained with binary cross-entropy against the oracle
            top-(k−s) experts; a single linear layer so it fits the partition format.    calibration

Oracle routing (top-k by ‖y_e(x)‖) needs the dense layer's output, so it is not a
router but an evaluation mode: `metanet eval` reports it as oracle_rel_error.
"""

from __future__ import annotations

import torch

from metanet.calib.stats import active_mask
from metanet.checkpoints import FFNLayer
from metanet.errors import MetanetError
from metanet.moe.routing import expert_output_norms, select_experts
from metanet.partition.balanced import cluster_sums
from metanet.partition.least_squares import least_squares
from metanet.partition.methods import LayerCalibration
from metanet.partition.partition import OperatingPoint

DATA_FREE_ROUTERS = ("centroid", "scaled")
CALIBRATED_ROUTERS = ("cmoe", "lsq", "mlp")
ROUTERS = DATA_FREE_ROUTERS + CALIBRATED_ROUTERS

#: Each method's router as its authors pair them (joint: the strongest data-free router).
DEFAULT_ROUTER = {"random": "centroid", "kmeans": "centroid", "joint": "scaled", "coact": "mlp", "cmoe": "cmoe"}

MLP_STEPS, MLP_LR = 100, 3e-2


def check_router(name: str) -> None:
    """Raise a MetanetError unless `name` is a router that can be fitted and stored."""
    if name == "oracle":
        raise MetanetError("oracle routing is an evaluation mode (metanet eval reports oracle_rel_error), not a router to store; "
                           f"choose one of {', '.join(ROUTERS)}")
    if name not in ROUTERS:
        raise MetanetError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")


def fit_router(
    name: str, layer: FFNLayer, assign: torch.Tensor, point: OperatingPoint, calib: LayerCalibration | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router of one layer.   → (W [E, d] float32, b [E] float32)"""
    check_router(name)
    if name in CALIBRATED_ROUTERS and calib is None:
        raise MetanetError(f"router {name!r} needs calibration text (data-free routers: {', '.join(DATA_FREE_ROUTERS)})")
    with torch.no_grad():
        if name == "centroid":
            weights = torch.ones(layer.d_ff, device=layer.w_in.device)
        elif name == "scaled":
            weights = layer.w_out.norm(dim=0) * (layer.w_gate.norm(dim=1) if layer.w_gate is not None else 1.0)
        elif name == "cmoe":
            weights = _representatives(layer, assign, calib, point.experts)
        if name in ("centroid", "scaled", "cmoe"):
            return _weighted_member_means(layer, assign, weights, point.experts)
        oracle = expert_output_norms(layer, assign, calib.x, point.experts)  # [T, E]
        w, b = least_squares(calib.x, oracle)
    if name == "lsq":
        return w, b
    return _train_bce(calib.x, select_experts(oracle, point).float(), w, b, seed)


def _weighted_member_means(layer: FFNLayer, assign: torch.Tensor, weights: torch.Tensor, n_experts: int):
    """W_e = Σ_{j∈e} c_j w_in_j / Σ_{j∈e} c_j, b_e likewise with b_in.   weights c: [f]"""
    c = weights.double()
    totals = cluster_sums(c[:, None], assign, n_experts)[:, 0].clamp(min=1e-30)
    w = cluster_sums(c[:, None] * layer.w_in.double(), assign, n_experts)
    b_in = layer.b_in.double() if layer.b_in is not None else torch.zeros(layer.d_ff, dtype=torch.float64, device=c.device)
    b = cluster_sums((c * b_in)[:, None], assign, n_experts)[:, 0]
    return (w / totals[:, None]).float(), (b / totals).float()


def _representatives(layer: FFNLayer, assign: torch.Tensor, calib: LayerCalibration, n_experts: int) -> torch.Tensor:
    """One-hot weights picking each expert's representative: the member whose activation markers
    over the calibration tokens lie closest (Hamming) to the expert's mean markers.   → [f]"""
    markers = active_mask(layer, layer.hidden(calib.x)).T.double()  # [f, T]
    sizes = torch.bincount(assign, minlength=n_experts).clamp(min=1).double()
    device = markers.device
    mean = cluster_sums(markers, assign, n_experts) / sizes[:, None]
    closeness = -(markers - mean[assign]).pow(2).sum(1)  # [f]
    best = torch.zeros(n_experts, dtype=closeness.dtype, device=device).scatter_reduce(0, assign, closeness, "amax", include_self=False)
    candidates = torch.nonzero(closeness == best[assign]).flatten()
    first = torch.full((n_experts,), len(assign), dtype=torch.int64, device=device).scatter_reduce(0, assign[candidates], candidates, "amin")
    weights = torch.zeros(len(assign), dtype=torch.float64, device=device)
    weights[first] = 1.0  # ties: the lowest index wins
    return weights


def _train_bce(x: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, b: torch.Tensor, seed: int):
    """Logistic router: minimise BCE(σ(x·Wᵀ + b), labels), from the given start, full batch, Adam."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)  # train on standardised inputs, fold back after
    xs = (x - mean) / std
    weight = (w * std).clone().requires_grad_(True)
    bias = (b + w @ mean).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=MLP_LR)
    for _ in range(MLP_STEPS):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ weight.T + bias, labels)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        w_out = weight / std
        return w_out.contiguous(), (bias - w_out @ mean).contiguous()
