"""Partitioners: which hidden neurons form which expert.

Every method returns `assign` [f] with exactly m = f/E neurons per expert. With s shared
experts, the s·m most important neurons form experts 0..s-1 (importance: activation rate
when calibration data is given, else the data-free proxy ‖w_in_j‖·‖w_out[:, j]‖, times
‖w_gate_j‖ for gated layers); the method splits the rest into the E−s routed experts.

- random  seeded balanced random split (LLaMA-MoE's baseline).                    data-free
- kmeans  balanced spherical k-means on normalised input rows, gate and up
          concatenated for gated layers (MoEfication's parameter clustering).       data-free
- joint   balanced spherical k-means on each neuron's normalised input row(s)
          concatenated with its normalised output column.                           data-free
- coact   the co-activation graph partitioned by METIS, then balanced exactly
          (MoEfication's co-activation clustering).                                 calibration
- cmoe    CMoE: centroids are the most frequently active routed neurons; neurons
          join centroids by a balanced linear assignment on the Hamming distance
          of their activation markers over calibration tokens.                      calibration
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from metanet.calib.stats import NeuronStats, active_mask, neuron_stats
from metanet.checkpoints import FFNLayer
from metanet.errors import MetanetError
from metanet.partition.balanced import balanced_assign, balanced_kmeans, optimal_balanced_assign
from metanet.partition.partition import OperatingPoint
from metanet.partition.shared import shared_first

DATA_FREE_METHODS = ("random", "kmeans", "joint")
CALIBRATED_METHODS = ("coact", "cmoe")
METHODS = DATA_FREE_METHODS + CALIBRATED_METHODS


@dataclass
class LayerCalibration:
    """What calibration text tells about one layer."""

    x: torch.Tensor  # [T, d] FFN inputs from the calibration split
    stats: NeuronStats


def layer_calibrations(layers: Iterable[FFNLayer], inputs: dict[int, torch.Tensor]) -> dict[int, LayerCalibration]:
    """Block index → LayerCalibration of each layer, from its calibration FFN inputs (inputs[index]: [T, d])."""
    return {layer.index: LayerCalibration(inputs[layer.index], neuron_stats(layer, inputs[layer.index])) for layer in layers}


def assign_neurons(method: str, layer: FFNLayer, point: OperatingPoint, calib: LayerCalibration | None = None, seed: int = 0) -> torch.Tensor:
    """Expert id of every hidden neuron, shared experts first.   → assign [f] int64"""
    if method not in METHODS:
        raise MetanetError(f"unknown partition method {method!r}; choose one of {', '.join(METHODS)}")
    if method in CALIBRATED_METHODS and calib is None:
        raise MetanetError(f"method {method!r} needs calibration text (data-free methods: {', '.join(DATA_FREE_METHODS)})")
    m = point.expert_width(layer.d_ff)
    importance = calib.stats.activation_rate if calib is not None else output_weighted_norms(layer)
    return shared_first(importance, point, m, lambda routed: _ROUTED[method](layer, routed, point.routed, m, calib, seed))


def output_weighted_norms(layer: FFNLayer) -> torch.Tensor:
    """Data-free importance of each neuron: ‖w_in_j‖·‖w_out[:, j]‖ (·‖w_gate_j‖ when gated).   → [f]"""
    importance = layer.w_in.norm(dim=1) * layer.w_out.norm(dim=0)
    if layer.w_gate is not None:
        importance = importance * layer.w_gate.norm(dim=1)
    return importance


def input_features(layer: FFNLayer) -> torch.Tensor:
    """Normalised input row(s) of each neuron, gate and up concatenated.   → [f, d or 2d]"""
    rows = [F.normalize(layer.w_in, dim=1)]
    if layer.w_gate is not None:
        rows.append(F.normalize(layer.w_gate, dim=1))
    return torch.cat(rows, dim=1)


# Each routed splitter: (layer, neuron ids R [n], K experts, width m, calib, seed) → cluster id in 0..K-1 for each of R.


def _random(layer, neurons, k, m, calib, seed):
    perm = torch.randperm(len(neurons), generator=torch.Generator().manual_seed(seed))
    clusters = torch.empty(len(neurons), dtype=torch.int64)
    clusters[perm] = torch.arange(k).repeat_interleave(m)
    return clusters


def _kmeans(layer, neurons, k, m, calib, seed):
    return balanced_kmeans(input_features(layer)[neurons], k, m, seed=seed)


def _joint(layer, neurons, k, m, calib, seed):
    features = torch.cat([input_features(layer), F.normalize(layer.w_out.T, dim=1)], dim=1)
    return balanced_kmeans(features[neurons], k, m, seed=seed)


def _coact(layer, neurons, k, m, calib, seed):
    """METIS on the co-activation graph among `neurons`, then an exact balance: each neuron's
    affinity to every part (its co-activation mass there) decides moves out of over-full parts."""
    import pymetis

    n = len(neurons)
    position = torch.full((layer.d_ff,), -1, dtype=torch.int64)
    position[neurons] = torch.arange(n)
    coact = calib.stats.coactivation.coalesce()
    i, j = position[coact.indices()[0]], position[coact.indices()[1]]
    keep = (i >= 0) & (j >= 0) & (i != j)
    i, j, w = i[keep], j[keep], coact.values()[keep].double()
    if k == 1:
        return torch.zeros(n, dtype=torch.int64)
    order = torch.argsort(i * n + j)  # CSR rows
    i, j, w = i[order], j[order], w[order]
    xadj = torch.zeros(n + 1, dtype=torch.int64)
    xadj[1:] = torch.bincount(i, minlength=n).cumsum(0)
    weights = (w / w.max() * 1000).round().clamp(min=1).long() if len(w) else w.long()  # METIS wants int weights
    options = pymetis.Options(seed=seed)
    graph = pymetis.CSRAdjacency(xadj.tolist(), j.tolist())
    parts = torch.tensor(pymetis.part_graph(k, adjacency=graph, eweights=weights.tolist(), options=options).vertex_part, dtype=torch.int64)
    affinity = torch.zeros(n, k, dtype=torch.float64).index_put_((i, parts[j]), w, accumulate=True)
    affinity = affinity / affinity.sum(1, keepdim=True).clamp(min=1e-12)
    return balanced_assign(-(affinity + F.one_hot(parts, k)), m)


def _cmoe(layer, neurons, k, m, calib, seed):
    markers = active_mask(layer, layer.hidden(calib.x)).T[neurons].double()  # [n, T] 0/1
    rate = calib.stats.activation_rate[neurons]
    centroids = markers[torch.argsort(rate, descending=True, stable=True)[:k]]  # [k, T]
    hamming = markers.sum(1, keepdim=True) + centroids.sum(1) - 2 * markers @ centroids.T  # [n, k]
    return optimal_balanced_assign(hamming, m)


_ROUTED = {"random": _random, "kmeans": _kmeans, "joint": _joint, "coact": _coact, "cmoe": _cmoe}
