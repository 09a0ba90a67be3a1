"""Balanced assignment of n items to K clusters of exactly `capacity` items each (n = K·capacity).

`balanced_assign` is greedy: all (item, cluster) pairs in increasing cost, each taken
while both item and cluster are free; `optimal_balanced_assign` solves the same problem
exactly as a linear assignment (scipy) on an n × n cost matrix, for moderate n.
`balanced_kmeans` alternates a balanced assignment with centroid updates (Lloyd's
algorithm under equal cluster sizes), on the unit sphere when `spherical`.
"""

from __future__ import annotations

import numpy as np
import torch

#: Items above which the exact n × n linear assignment is replaced by the greedy one (memory: 8·n² bytes).
OPTIMAL_ASSIGN_LIMIT = 4096


def balanced_assign(cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy balanced assignment.   cost: [n, K] (lower is better) → cluster id [n] int64."""
    n, k = cost.shape
    if n != k * capacity:
        raise ValueError(f"{n} items cannot fill {k} clusters of {capacity}")
    order = np.argsort(cost.detach().double().cpu().numpy(), axis=None, kind="stable")
    assign = np.full(n, -1, dtype=np.int64)
    room = np.full(k, capacity, dtype=np.int64)
    remaining = n
    for flat in order:
        item, cluster = divmod(int(flat), k)
        if assign[item] < 0 and room[cluster] > 0:
            assign[item] = cluster
            room[cluster] -= 1
            remaining -= 1
            if remaining == 0:
                break
    return torch.from_numpy(assign)


def optimal_balanced_assign(cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """Minimum-total-cost balanced assignment (each cluster column repeated `capacity` times);
    falls back to `balanced_assign` above OPTIMAL_ASSIGN_LIMIT items.   cost: [n, K] → [n]"""
    from scipy.optimize import linear_sum_assignment

    n, k = cost.shape
    if n > OPTIMAL_ASSIGN_LIMIT:
        return balanced_assign(cost, capacity)
    expanded = np.repeat(cost.detach().double().cpu().numpy(), capacity, axis=1)  # [n, K·capacity]
    rows, cols = linear_sum_assignment(expanded)
    assign = np.empty(n, dtype=np.int64)
    assign[rows] = cols // capacity
    return torch.from_numpy(assign)


def balanced_kmeans(
    features: torch.Tensor, k: int, capacity: int, seed: int = 0, iters: int = 25, spherical: bool = True, init: str = "random"
) -> torch.Tensor:
    """Equal-size k-means.   features: [n, D] → cluster id [n] int64.

    spherical: features and centroids live on the unit sphere and cost = −cos(feature, centroid);
    otherwise cost = squared Euclidean distance. init "random": centroids start at k distinct
    seeded items; "farthest": deterministic farthest-point start (the item farthest from the
    mean, then repeatedly the item farthest from those chosen), so that permuting the items
    permutes the clusters (up to exact ties).
    """
    x = features.double()
    if spherical:
        x = torch.nn.functional.normalize(x, dim=1)
    if init == "farthest":
        centroids = x[_farthest_points(x, k)]
    else:
        generator = torch.Generator().manual_seed(seed)
        centroids = x[torch.randperm(x.shape[0], generator=generator)[:k]]
    assign = None
    for _ in range(iters):
        cost = -(x @ centroids.T) if spherical else torch.cdist(x, centroids).pow(2)
        new_assign = balanced_assign(cost, capacity)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        centroids = torch.zeros_like(centroids).index_add_(0, assign, x) / capacity
        if spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
    return assign


def _farthest_points(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of k items: the one farthest from the mean, then greedily the farthest from all chosen.   x: [n, D]"""
    chosen = [int(torch.cdist(x, x.mean(0, keepdim=True)).squeeze(1).argmax())]
    nearest = torch.cdist(x, x[chosen]).squeeze(1)  # [n] distance to the closest chosen item
    for _ in range(k - 1):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, torch.cdist(x, x[chosen[-1:]]).squeeze(1))
    return torch.tensor(chosen)
