"""The metanetwork: one forward pass over an FFN layer's parameter graph → per-neuron outputs,
and from them a balanced expert assignment and a router.

    features (metanet.model.features)  →  L × BipartiteLayer  →  h [f, w], r [d, w]

Per-neuron heads (`NeuronOutputs`), all reading LayerNorm(h_j):
    importance_j = log(‖w_in_j‖·‖w_out[:, j]‖(·‖w_gate_j‖)) + MLP_i(h_j)
                   which neurons form the shared experts; starts at the data-free proxy of the baselines
    space_j      = [√π₁ â_j (‖ ĝ_j),  √π₂ ô_j,  √π₃ ẑ_j],  ẑ = normalise(u − mean_j' u_j'), u = MLP_z(h)
                   the clustering space: the kmeans baseline's normalised input rows, the output columns and a
                   learned embedding (centred: a component all neurons share says nothing about clusters),
                   mixed by π = softmax(mix), which starts close to the kmeans baseline (π₁ ≈ 0.96)

and per residual coordinate i, reading LayerNorm(r_i):
    (σ_i, μ_i)   = 2·tanh(MLP_x(r_i) / 2)   a model of the layer's inputs (metanet.model.synthetic):
                   x_i = γ_i e^{σ_i} z_i + β_i + γ_i μ_i with z ~ N(0, 1), γ, β the FFN's norm weight and bias;
                   it starts at the norm's own scale and offset (σ = μ = 0)

Assignment: the s·m most important neurons form the shared experts; the rest are split into
E − s equal experts by balanced spherical k-means in `space` with a deterministic farthest-point
start, so the same weights always give the same partition and permuting neurons permutes it.
Router (`expert_router`): the least-squares fit [X 1]·[W b]ᵀ ≈ S of the oracle expert scores
S_te = ‖y_e(x_t)‖ on synthetic inputs X drawn from that input model — the `lsq` router, with the
calibration text replaced by what the network predicts about the inputs. No text is read.
Works for any d and f (all aggregations are means) and any E dividing f. Invariance to ReLU
rescaling: features, importance and assignment are invariant (by normalisation); the router is
invariant in distribution (it fits invariant oracle scores, on noise that the rescaling redraws).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metanet.calib.stats import NeuronStats
from metanet.checkpoints import FFNLayer
from metanet.model.features import EDGE_CHANNELS, HIDDEN_FEATURES, RESIDUAL_FEATURES, GraphFeatures, layer_features
from metanet.model.layers import BipartiteLayer, mlp
from metanet.model.synthetic import synthetic_inputs
from metanet.moe.routing import expert_output_norms
from metanet.partition.balanced import balanced_kmeans
from metanet.partition.least_squares import least_squares
from metanet.partition.partition import LayerPartition, OperatingPoint
from metanet.partition.shared import shared_first

_EPS = 1e-12
INPUT_BOUND = 2.0  # |σ|, |μ| ≤ 2
SYNTHETIC_TOKENS = 1024  # synthetic inputs the router is fitted on (2048 changed MiniLM rel_error by 0.001)


@dataclass(frozen=True)
class MetaNetConfig:
    width: int = 64
    depth: int = 4
    embedding: int = 32  # size of the learned part ẑ of the clustering space
    kmeans_iters: int = 25


@dataclass
class NeuronOutputs:
    importance: torch.Tensor  # [f]
    space: torch.Tensor  # [f, D] unit rows, D = (d or 2d) + d + embedding
    input_scale: torch.Tensor  # [d] σ: log-scale of each input coordinate relative to the norm weight γ
    input_shift: torch.Tensor  # [d] μ: offset of each input coordinate in units of γ


class MetaNetwork(nn.Module):
    def __init__(self, config: MetaNetConfig = MetaNetConfig()):
        super().__init__()
        self.config = config
        w = config.width
        self.embed_hidden = mlp(HIDDEN_FEATURES, w, w)
        self.embed_residual = mlp(RESIDUAL_FEATURES, w, w)
        self.layers = nn.ModuleList(BipartiteLayer(w, EDGE_CHANNELS) for _ in range(config.depth))
        self.head_norm = nn.LayerNorm(w)
        self.importance_head = _zero_last(mlp(w, w, 1))
        self.cluster_head = mlp(w, w, config.embedding)
        self.input_norm = nn.LayerNorm(w)
        self.input_head = _zero_last(mlp(w, w, 2))
        self.mix = nn.Parameter(torch.tensor([2.0, -2.0, -2.0]))  # input rows, output columns, learned embedding

    def embed(self, layer: FFNLayer, stats: NeuronStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Node states after message passing: (h [f, w], r [d, w])."""
        return self._propagate(layer_features(layer, stats))

    def _propagate(self, features: GraphFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        h, r = self.embed_hidden(features.hidden), self.embed_residual(features.residual)
        for block in self.layers:
            h, r = block(h, r, features.edges)
        return h, r

    def neuron_outputs(self, layer: FFNLayer, stats: NeuronStats | None = None) -> NeuronOutputs:
        features = layer_features(layer, stats)
        h, r = self._propagate(features)
        h = self.head_norm(h)
        # the clustering space from the normalised rows the edges already hold (edge channels: √d·â, √d·ô, d·â⊙ô, √d·ĝ)
        pi = torch.softmax(self.mix, dim=0)
        gated = layer.w_gate is not None
        input_weight = (pi[0] / (2 if gated else 1)).sqrt() / layer.d_model**0.5  # [â, ĝ] together has unit rows
        blocks = [features.edges[0] * input_weight, *([features.edges[3] * input_weight] if gated else []),
                  features.edges[1] * (pi[1].sqrt() / layer.d_model**0.5), pi[2].sqrt() * F.normalize(centred(self.cluster_head(h)), dim=1)]
        scale = layer.w_out.float().norm(dim=0) * (layer.w_gate.float().norm(dim=1) if gated else 1.0)  # [f]
        log_scale = (layer.w_in.float().norm(dim=1) * scale).clamp(min=_EPS).log()
        input_scale, input_shift = (INPUT_BOUND * torch.tanh(self.input_head(self.input_norm(r)) / INPUT_BOUND)).unbind(1)
        return NeuronOutputs(
            importance=log_scale + self.importance_head(h).squeeze(1),
            space=torch.cat(blocks, dim=1),
            input_scale=input_scale,
            input_shift=input_shift,
        )

    @torch.no_grad()
    def predict(self, layer: FFNLayer, point: OperatingPoint, stats: NeuronStats | None = None) -> LayerPartition:
        """A balanced assignment (shared experts first) and its router for one layer."""
        m = point.expert_width(layer.d_ff)
        out = self.neuron_outputs(layer, stats)
        assign = self.assign(out, point, m)
        weight, bias = expert_router(layer, assign, out, point.experts)
        return LayerPartition(assign, weight, bias)

    def assign(self, out: NeuronOutputs, point: OperatingPoint, m: int) -> torch.Tensor:
        """Shared experts by importance, routed ones by balanced k-means in the clustering space.   → [f] int64"""
        return shared_first(out.importance, point, m, lambda routed: balanced_kmeans(
            out.space[routed], point.routed, m, iters=self.config.kmeans_iters, init="farthest", dtype=torch.float32))

    def config_dict(self) -> dict:
        return asdict(self.config)


def centred(u: torch.Tensor) -> torch.Tensor:
    """u − its mean over neurons.   [f, D] → [f, D]"""
    return u - u.mean(0, keepdim=True)


def expert_router(layer: FFNLayer, assign: torch.Tensor, out: NeuronOutputs, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares router on the network's synthetic inputs (module docstring).   → ([E, d], [E])"""
    x = synthetic_inputs(layer, out.input_scale, out.input_shift, SYNTHETIC_TOKENS)  # [T, d]
    return least_squares(x, expert_output_norms(layer, assign, x, n_experts))


def _zero_last(net: nn.Sequential) -> nn.Sequential:
    """Zero the last linear layer, so the head starts as an exact no-op correction."""
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net
