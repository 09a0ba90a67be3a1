"""The least-squares router fit shared by the `lsq` router (calibration inputs) and the metanetwork's
router (synthetic inputs): argmin_θ ‖Dθ − S‖² + λ‖θ‖² with D = [X 1], λ = LSQ_RIDGE · mean diag(DᵀD),
solved as (DᵀD + λI)⁻¹DᵀS, or as Dᵀ(DDᵀ + λI)⁻¹S (the same θ) when there are fewer tokens than
columns, so that a 4096-wide layer fitted on 1024 tokens solves a 1024² system, not a 4097² one.
Differentiable, so the metanetwork trains through it."""

from __future__ import annotations

import torch

LSQ_RIDGE = 1e-3  # relative to the mean diagonal of XᵀX


def least_squares(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, d], targets: [T, E] → (W [E, d], b [E]) float32, solved in float64."""
    design = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)], dim=1)  # [T, d+1]
    ridge = LSQ_RIDGE * design.pow(2).sum() / design.shape[1]  # LSQ_RIDGE · mean diag(DᵀD)
    if design.shape[0] < design.shape[1]:
        gram = design @ design.T  # [T, T]
        theta = design.T @ torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=torch.float64, device=x.device), targets.double())
    else:
        gram = design.T @ design  # [d+1, d+1]
        theta = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=torch.float64, device=x.device), design.T @ targets.double())  # [d+1, E]
    return theta[:-1].T.float().contiguous(), theta[-1].float().contiguous()
