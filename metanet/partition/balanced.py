"""Balanced assignment of n items to K clusters of exactly `capacity` items each (n = K·capacity).

`balanced_assign` is greedy: all (item, cluster) pairs in increasing cost, each taken
while both item and cluster are free (computed in vectorised rounds); `optimal_balanced_assign` solves the same problem
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
    """Greedy balanced assignment.   cost: [n, K] (lower is better) → cluster id [n] int64.

    Same result as walking all n·K pairs in increasing (cost, flat index) order, but in at most
    K vectorised rounds: every free item proposes its cheapest cluster with room; proposals are
    accepted in (cost, flat index) order up to and including the one that fills a cluster first
    (until then the walk would accept each of them, since no proposal's cluster is full yet).
    """
    n, k = cost.shape
    if n != k * capacity:
        raise ValueError(f"{n} items cannot fill {k} clusters of {capacity}")
    costs = cost.detach().double().cpu().numpy()
    assign = np.full(n, -1, dtype=np.int64)
    room = np.full(k, capacity, dtype=np.int64)
    free = np.arange(n)
    while free.size:
        open_costs = np.where(room > 0, costs[free], np.inf)  # [n_free, K]
        best = open_costs.argmin(axis=1)  # ties → lowest cluster, i.e. lowest flat index
        order = np.lexsort((free * k + best, open_costs[np.arange(free.size), best]))
        clusters = best[order]
        rank = np.cumsum(np.eye(k, dtype=np.int64)[clusters], axis=0)[np.arange(clusters.size), clusters] - 1
        fills = np.flatnonzero(rank == room[clusters] - 1)
        taken = order[: fills[0] + 1] if fills.size else order
        assign[free[taken]] = best[taken]
        room -= np.bincount(best[taken], minlength=k)
        free = np.flatnonzero(assign < 0)
    return torch.from_numpy(assign).to(cost.device)


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
    return torch.from_numpy(assign).to(cost.device)


def balanced_kmeans(
    features: torch.Tensor, k: int, capacity: int, seed: int = 0, iters: int = 25, spherical: bool = True, init: str = "random",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Equal-size k-means.   features: [n, D] → cluster id [n] int64.

    spherical: features and centroids live on the unit sphere and cost = −cos(feature, centroid);
    otherwise cost = squared Euclidean distance. init "random": centroids start at k distinct
    seeded items; "farthest": deterministic farthest-point start (the item farthest from the
    mean, then repeatedly the item farthest from those chosen), so that permuting the items
    permutes the clusters (up to exact ties). `dtype`: the precision of the iterations (float32 halves the
    memory of a large feature matrix).
    """
    x = features.to(dtype)
    if spherical:
        x = torch.nn.functional.normalize(x, dim=1)
    if init == "farthest":
        centroids = x[_farthest_points(x, k)]
    else:
        generator = torch.Generator().manual_seed(seed)
        centroids = x[torch.randperm(x.shape[0], generator=generator, device="cpu")[:k].to(x.device)]
    assign = None
    for _ in range(iters):
        cost = -(x @ centroids.T) if spherical else torch.cdist(x, centroids).pow(2)
        new_assign = balanced_assign(cost, capacity)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        centroids = cluster_sums(x, assign, k) / capacity
        if spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
    return assign


def cluster_sums(x: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Σ of the rows of each cluster.   x: [n, D], assign: [n] in 0..k-1 → [k, D]

    index_add on the CPU. On a GPU index_add adds with atomics in no fixed order, so the sums, and
    through near-ties the partition, would vary from run to run: there a one-hot product, whose
    order is fixed (n·k·D multiply-adds, nothing for a GPU at k ≤ 64)."""
    if x.is_cuda:
        return torch.nn.functional.one_hot(assign, k).T.to(x.dtype) @ x
    return torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assign, x)


def _farthest_points(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of k items: the one farthest from the mean, then greedily the farthest from all chosen.   x: [n, D]

    Squared distances from inner products, ‖a − b‖² = ‖a‖² − 2a·b + ‖b‖², one matrix-vector product per pick.
    """
    squares = x.pow(2).sum(1)  # [n]

    def distances_to(point: torch.Tensor) -> torch.Tensor:  # [n]
        return squares - 2 * (x @ point) + point.pow(2).sum()

    chosen = [int(distances_to(x.mean(0)).argmax())]
    nearest = distances_to(x[chosen[0]])  # [n] squared distance to the closest chosen item
    for _ in range(k - 1):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, distances_to(x[chosen[-1]]))
    return torch.tensor(chosen, device=x.device)
