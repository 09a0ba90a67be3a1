"""The metanetwork: one forward pass over an FFN layer's parameter graph → neuron embeddings,
and from them a balanced expert assignment and a router.

    features (metanet.model.features)  →  L × BipartiteLayer  →  h [f, w], r [d, w]
    importance_j = MLP(h_j)                       which neurons form the shared experts
    z_j = normalise(u_j − mean_j' u_j'), u = MLP(h)  clustering space of the routed experts (centred: the
                                                    component all neurons share says nothing about clusters)
    α_j = softplus(MLP(h_j))                       each neuron's weight in its expert's router

Assignment: the s·m most important neurons form the shared experts; the rest are split into
E − s equal experts by balanced spherical k-means on z with a deterministic farthest-point
start, so the same weights always give the same partition and permuting neurons permutes it.
Router: W_e = Σ_{j∈e} α_j w_in_j / Σ_{j∈e} α_j and b_e likewise with b_in, a learned
generalisation of the `scaled` router; it lives in the layer's own residual basis.
Works for any d and f (all aggregations are means) and any E dividing f.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from metanet.calib.stats import NeuronStats
from metanet.checkpoints import FFNLayer
from metanet.model.features import EDGE_CHANNELS, HIDDEN_FEATURES, RESIDUAL_FEATURES, layer_features
from metanet.model.layers import BipartiteLayer, mlp
from metanet.partition.balanced import balanced_kmeans
from metanet.partition.partition import LayerPartition, OperatingPoint


@dataclass(frozen=True)
class MetaNetConfig:
    width: int = 64
    depth: int = 4
    embedding: int = 32  # size of the clustering space z
    kmeans_iters: int = 25


class MetaNetwork(nn.Module):
    def __init__(self, config: MetaNetConfig = MetaNetConfig()):
        super().__init__()
        self.config = config
        w = config.width
        self.embed_hidden = mlp(HIDDEN_FEATURES, w, w)
        self.embed_residual = mlp(RESIDUAL_FEATURES, w, w)
        self.layers = nn.ModuleList(BipartiteLayer(w, EDGE_CHANNELS) for _ in range(config.depth))
        self.importance_head = mlp(w, w, 1)
        self.cluster_head = mlp(w, w, config.embedding)
        self.router_head = mlp(w, w, 1)

    def embed(self, layer: FFNLayer, stats: NeuronStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Node states after message passing: (h [f, w], r [d, w])."""
        features = layer_features(layer, stats)
        h, r = self.embed_hidden(features.hidden), self.embed_residual(features.residual)
        for block in self.layers:
            h, r = block(h, r, features.edges)
        return h, r

    def heads(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """importance [f], cluster embedding z [f, embedding] (unit rows), router weight α [f] > 0."""
        return {
            "importance": self.importance_head(h).squeeze(1),
            "z": nn.functional.normalize(centred(self.cluster_head(h)), dim=1),
            "alpha": nn.functional.softplus(self.router_head(h).squeeze(1)),
        }

    @torch.no_grad()
    def predict(self, layer: FFNLayer, point: OperatingPoint, stats: NeuronStats | None = None) -> LayerPartition:
        """A balanced assignment (shared experts first) and its router for one layer."""
        m = point.expert_width(layer.d_ff)
        out = self.heads(self.embed(layer, stats)[0])
        order = torch.argsort(out["importance"], descending=True, stable=True)
        shared, routed = order[: point.shared * m], torch.sort(order[point.shared * m :]).values
        assign = torch.empty(layer.d_ff, dtype=torch.int64)
        assign[shared] = torch.arange(point.shared).repeat_interleave(m)
        assign[routed] = point.shared + balanced_kmeans(out["z"][routed], point.routed, m, iters=self.config.kmeans_iters, init="farthest")
        weight, bias = expert_router(layer, assign, out["alpha"], point.experts)
        return LayerPartition(assign, weight, bias)

    def config_dict(self) -> dict:
        return asdict(self.config)


def centred(u: torch.Tensor) -> torch.Tensor:
    """u − its mean over neurons.   [f, D] → [f, D]"""
    return u - u.mean(0, keepdim=True)


def expert_router(layer: FFNLayer, assign: torch.Tensor, alpha: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W_e = Σ_{j∈e} α_j w_in_j / Σ_{j∈e} α_j,  b_e = Σ_{j∈e} α_j b_in_j / Σ_{j∈e} α_j.   → ([E, d], [E])"""
    totals = torch.zeros(n_experts, dtype=alpha.dtype).index_add(0, assign, alpha).clamp(min=1e-12)  # [E]
    weight = torch.zeros(n_experts, layer.d_model, dtype=alpha.dtype).index_add(0, assign, alpha[:, None] * layer.w_in.to(alpha.dtype))
    b_in = layer.b_in.to(alpha.dtype) if layer.b_in is not None else torch.zeros_like(alpha)
    bias = torch.zeros(n_experts, dtype=alpha.dtype).index_add(0, assign, alpha * b_in)
    return weight / totals[:, None], bias / totals
