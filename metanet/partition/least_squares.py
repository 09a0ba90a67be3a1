"""The least-squares router fit shared by the `lsq` router (calibration inputs) and the metanetwork's
router (synthetic inputs): argmin_θ ‖[X 1]θ − S‖² + λ‖θ‖², λ = LSQ_RIDGE · mean diag([X 1]ᵀ[X 1]).
Differentiable, so the metanetwork trains through it."""

from __future__ import annotations

import torch

LSQ_RIDGE = 1e-3  # relative to the mean diagonal of XᵀX


def least_squares(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, d], targets: [T, E] → (W [E, d], b [E]) float32, solved in float64."""
    design = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    gram = design.T @ design
    gram = gram + LSQ_RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    theta = torch.linalg.solve(gram, design.T @ targets.double())  # [d+1, E]
    return theta[:-1].T.float().contiguous(), theta[-1].float().contiguous()
