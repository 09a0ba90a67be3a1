"""Synthetic FFN inputs from the metanetwork's model of a layer's input distribution.

    x_t,i = γ_i e^{σ_i} z_t,i + β_i + γ_i μ_i        t = 1..T, i = 1..d

γ, β: the norm in front of the FFN (ones and zeros without one); σ, μ: predicted per residual
coordinate. z is standard normal noise drawn per coordinate from a seed that is a hash of the
coordinate's HASHED_VALUES largest input weights (the top of the sorted column w_in[:, i]), so the inputs
are deterministic, permuting hidden neurons changes nothing (the sorted column is the same) and
permuting residual coordinates permutes the columns of x exactly. (A ReLU rescaling of neurons redraws the noise: the router fitted
on it is invariant in distribution only. Hashing normalised rows instead would make it exact for
rescalings but break exactness for residual permutations, through the rounding of the norms.)
"""

from __future__ import annotations

import hashlib

import torch

from metanet.checkpoints import FFNLayer

HASHED_VALUES = 16  # a column's largest weights that seed its noise: distinct columns share them with negligible chance


def coordinate_noise(layer: FFNLayer, n_tokens: int) -> torch.Tensor:
    """z [T, d]: column i from a generator seeded by a hash of the HASHED_VALUES largest entries of w_in[:, i]."""
    top = min(HASHED_VALUES, layer.d_ff)
    columns = layer.w_in.float().cpu().topk(top, dim=0).values.T.contiguous().numpy()  # [d, top], each column in decreasing order
    noise = torch.empty(layer.d_model, n_tokens, device="cpu")  # drawn on the CPU: the same numbers wherever the layer is
    generator = torch.Generator()
    for i, column in enumerate(columns):
        generator.manual_seed(int.from_bytes(hashlib.blake2b(column.tobytes(), digest_size=8).digest(), "little") >> 1)
        noise[i] = torch.randn(n_tokens, generator=generator, device="cpu")
    return noise.T.to(layer.w_in.device)


def synthetic_inputs(layer: FFNLayer, scale: torch.Tensor, shift: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """x [T, d] = γ e^σ z + β + γ μ.   scale σ, shift μ: [d]"""
    d = layer.d_model
    device = layer.w_in.device
    gamma = layer.norm.weight.float() if layer.norm is not None else torch.ones(d, device=device)
    beta = layer.norm.bias.float() if layer.norm is not None and layer.norm.bias is not None else torch.zeros(d, device=device)
    return coordinate_noise(layer, n_tokens) * (gamma * scale.exp()) + beta + gamma * shift
