"""Shared experts first: how every partitioner lays out an assignment.

With s shared experts of m neurons each, the s·m most important neurons form experts 0..s−1
(m each, in decreasing importance); the partitioner splits the others into the E − s routed
experts s..E−1:

    assign[shared[q]] = q // m                 q = 0..s·m−1
    assign[routed[r]] = s + cluster(routed)[r]
"""

from __future__ import annotations

from typing import Callable

import torch

from metanet.partition.partition import OperatingPoint


def split_shared(importance: torch.Tensor, n_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the n_shared most important neuron ids, most important first; the other ids in increasing order)."""
    order = torch.argsort(importance.detach(), descending=True, stable=True)
    return order[:n_shared], torch.sort(order[n_shared:]).values


def shared_first(importance: torch.Tensor, point: OperatingPoint, m: int, cluster: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """assign [f] int64 (module docstring). importance: [f]; cluster(routed ids [n]) → routed expert 0..E−s−1 of each, [n]."""
    shared, routed = split_shared(importance, point.shared * m)
    assign = torch.empty(importance.shape[0], dtype=torch.int64, device=importance.device)
    assign[shared] = torch.arange(point.shared, device=assign.device).repeat_interleave(m)
    assign[routed] = point.shared + cluster(routed).to(assign.device)
    return assign
