"""Input features of a layer's parameter graph for the metanetwork, invariant by construction.

Hidden neuron j is described through its *normalised* weights, so that the ReLU
symmetry (row j of w_in and b_in times c > 0, column j of w_out divided by c) leaves
every feature unchanged (invariance by normalisation, not by augmentation):

    â_j = w_in_j / ‖w_in_j‖          ĝ_j = w_gate_j / ‖w_gate_j‖          ô_j = w_out[:, j] / ‖w_out[:, j]‖
    hidden features  [ b_in_j / ‖w_in_j‖,  log(‖w_in_j‖·‖w_gate_j‖·‖w_out[:, j]‖) − mean_j(·),
                       log‖w_in_j‖ − mean_j(·) (0 for positively homogeneous activations),
                       activation rate, mean |a| / mean_j(mean |a|), has-statistics flag ]
    residual features [ norm weight, norm bias, b_out / RMS(b_out) ... ] (see residual_features)

Edge channels (dense [f, d] blocks scaled by √d so entries are O(1) for any width):
    √d·â, √d·ô (and √d·ĝ for gated layers), and the path product d·â⊙ô.
All statistics are means over neurons or coordinates, so the features do not depend on
d or f and permuting neurons (or residual coordinates) permutes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metanet.calib.stats import NeuronStats
from metanet.checkpoints import FFNLayer
from metanet.checkpoints.ffn_layer import POSITIVELY_HOMOGENEOUS

HIDDEN_FEATURES = 6
RESIDUAL_FEATURES = 4
EDGE_CHANNELS = 4  # w_in, w_out, path product, gate (zeros when ungated)

_EPS = 1e-12


@dataclass
class GraphFeatures:
    hidden: torch.Tensor  # [f, HIDDEN_FEATURES]
    residual: torch.Tensor  # [d, RESIDUAL_FEATURES]
    edges: torch.Tensor  # [EDGE_CHANNELS, f, d]


def layer_features(layer: FFNLayer, stats: NeuronStats | None = None) -> GraphFeatures:
    w_in, w_out = layer.w_in.float(), layer.w_out.float()
    f, d = w_in.shape
    in_norm = w_in.norm(dim=1).clamp(min=_EPS)  # [f]
    out_norm = w_out.norm(dim=0).clamp(min=_EPS)  # [f]
    a_hat = w_in / in_norm[:, None]  # [f, d]
    o_hat = (w_out / out_norm).T  # [f, d]
    scale = in_norm * out_norm
    if layer.w_gate is not None:
        gate_norm = layer.w_gate.float().norm(dim=1).clamp(min=_EPS)
        g_hat = layer.w_gate.float() / gate_norm[:, None]
        scale = scale * gate_norm
    else:
        g_hat = torch.zeros_like(a_hat)
    log_scale = scale.log()
    log_in = in_norm.log()
    homogeneous = layer.activation in POSITIVELY_HOMOGENEOUS
    zeros = lambda: torch.zeros(f, device=w_in.device)  # noqa: E731
    b_in = layer.b_in.float() / in_norm if layer.b_in is not None else zeros()
    if stats is not None:
        rate = stats.activation_rate.float()
        mean_abs = stats.mean_abs.float() / stats.mean_abs.float().mean().clamp(min=_EPS)
        flag = torch.ones(f, device=w_in.device)
    else:
        rate, mean_abs, flag = zeros(), zeros(), zeros()
    hidden = torch.stack(
        [b_in, log_scale - log_scale.mean(), zeros() if homogeneous else log_in - log_in.mean(), rate, mean_abs, flag], dim=1
    )
    residual = residual_features(layer)
    root_d = d**0.5
    edges = torch.stack([root_d * a_hat, root_d * o_hat, d * a_hat * o_hat, root_d * g_hat])
    return GraphFeatures(hidden=hidden, residual=residual, edges=edges)


def residual_features(layer: FFNLayer) -> torch.Tensor:
    """[d, 4]: norm weight, norm bias, b_out / RMS(b_out), and how much the coordinate is read
    (d · mean_j â_ji², which is 1 on average)."""
    d = layer.d_model
    norm = layer.norm
    device = layer.w_in.device
    weight = norm.weight.float() if norm is not None else torch.ones(d, device=device)
    bias = norm.bias.float() if norm is not None and norm.bias is not None else torch.zeros(d, device=device)
    if layer.b_out is not None:
        b_out = layer.b_out.float()
        b_out = b_out / b_out.pow(2).mean().sqrt().clamp(min=_EPS)
    else:
        b_out = torch.zeros(d, device=device)
    a_hat = layer.w_in.float() / layer.w_in.float().norm(dim=1, keepdim=True).clamp(min=_EPS)
    read = d * a_hat.pow(2).mean(0)
    return torch.stack([weight, bias, b_out, read], dim=1)
