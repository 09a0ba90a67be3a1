"""Per-block sensitivity: how much the whole model loses when only block ℓ is carved, at each active count k.

For block ℓ and k in `actives`, block ℓ alone is converted at (E, k) as the pipeline would convert
it (partition, refinement, router and compensation fitted on the dense model's FFN inputs of the
fitting windows), every other block stays dense, and

    delta[ℓ, k] = mean NLL(model with block ℓ carved) − mean NLL(dense model)       (nats per token)

on other windows (measured on the windows it was fitted on, compensation would fit them almost
exactly and hide the loss); exp(delta) is that block's ppl_ratio. The assignment and router do not depend on
k for the data-free and calibrated methods' clustering, so they are fitted once per block at the largest
k below E and only the selection and compensation change with k (refinement, which does depend on k,
is fitted at that k too). Causal LMs only: an encoder has no perplexity.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from metanet.calib.capture import ENCODER_FAMILIES
from metanet.calib.stats import neuron_stats
from metanet.checkpoints import Checkpoint
from metanet.conversion.blocks import BlockWalk
from metanet.conversion.compensate import refit_down_projection
from metanet.errors import MetanetError
from metanet.eval.model_quality import dense_reference
from metanet.moe.convert import install_block, model_blocks
from metanet.moe.module import MoEFFN
from metanet.moe.routing import select_experts
from metanet.partition.make import layer_metanetwork, partition_layer, resolve_router
from metanet.partition.methods import LayerCalibration
from metanet.partition.partition import OperatingPoint

log = logging.getLogger(__name__)


@dataclass
class Sensitivity:
    """delta[ℓ, a]: the mean NLL increase (nats per token) when block ℓ alone runs actives[a] of `experts` experts."""

    experts: int
    shared: int
    actives: list[int]  # increasing, each < experts
    delta: torch.Tensor  # [L, len(actives)] float64
    dense_nll: float  # mean NLL of the dense model on the windows
    tokens: int  # tokens the NLLs were measured on
    fingerprints: list[str] = field(default_factory=list)  # FFNLayer.fingerprint() of each block measured: the checkpoint it belongs to

    def ppl_ratio(self) -> torch.Tensor:
        """exp(delta): each block's ppl_ratio when it alone is carved.   → [L, len(actives)]"""
        return self.delta.exp()

    def as_dict(self) -> dict:
        return {"experts": self.experts, "shared": self.shared, "actives": self.actives, "delta": self.delta.tolist(),
                "dense_nll": self.dense_nll, "tokens": self.tokens, "fingerprints": self.fingerprints}

    @classmethod
    def from_dict(cls, data: dict) -> Sensitivity:
        return cls(data["experts"], data["shared"], list(data["actives"]), torch.tensor(data["delta"], dtype=torch.float64),
                   data["dense_nll"], data["tokens"], list(data.get("fingerprints", [])))


def measure_sensitivity(
    checkpoint: Checkpoint,
    model,
    fit_windows: torch.LongTensor,
    windows: torch.LongTensor,
    settings,
    actives: list[int],
    metanetwork=None,
    progress: Callable[[], None] | None = None,
) -> Sensitivity:
    """The Sensitivity of every block of `checkpoint` (module docstring): fitted on `fit_windows` [N', S'] (the conversion's
    calibration windows), measured on `windows` [N, S] (others).

    `settings` is a ConversionSettings: its method, router, shared experts, refinement, compensation and
    ridge say how a block is carved (its plan and sequential flag play no part: blocks are carved alone).
    `model` is the dense transformers model; it is left as it was. `progress()` after each block.
    """
    family = checkpoint.family.name
    if family in ENCODER_FAMILIES:
        raise MetanetError("sensitivity is measured in perplexity: it needs a causal LM, not an encoder")
    experts, shared = settings.point.experts, settings.point.shared
    actives = sorted(set(actives))
    if not actives or actives[0] <= shared or actives[-1] >= experts:
        raise MetanetError(f"active counts must lie between shared+1={shared + 1} and E−1={experts - 1}, got {actives}")
    router = resolve_router(settings.method, settings.router)
    net = layer_metanetwork(metanetwork, settings.method, [router])
    dense = dense_reference(model, family, windows).mean().item()
    walk = BlockWalk(model, family, fit_windows)
    blocks = model_blocks(model, family)
    delta = torch.zeros(checkpoint.n_layers, len(actives), dtype=torch.float64)
    fit_point = OperatingPoint(experts, actives[-1], shared, settings.point.width_multiple)
    fingerprints = []
    for layer in checkpoint.layers():
        i = layer.index
        fingerprints.append(layer.fingerprint())
        x = walk.ffn_inputs()  # [T, d] the dense model's
        walk.advance(rerun=False)
        calib = LayerCalibration(x, neuron_stats(layer, x))
        fitted = partition_layer(layer, settings.method, fit_point, [router], calib, settings.seed, net, refine=settings.refine)[router]
        original = blocks[i]
        for a, k in enumerate(actives):
            point = OperatingPoint(experts, k, shared, settings.point.width_multiple)
            lp = copy.copy(fitted)
            if settings.compensate:
                refit = refit_down_projection(layer, x, lp.assign, select_experts(lp.scores(x), point), settings.ridge, bias=settings.output_bias)
                lp.w_out, lp.b_out = refit.w_out, refit.b_out
            carved = copy.deepcopy(original)
            blocks[i] = carved
            try:
                install_block(model, family, i, MoEFFN.from_layer(layer, lp, point).to(next(original.parameters()).device))
                delta[i, a] = dense_reference(model, family, windows).mean().item() - dense
            finally:
                blocks[i] = original
        log.info("block %d: ppl_ratio alone %s", i, ", ".join(f"k={k}: {math.exp(v):.3f}" for k, v in zip(actives, delta[i].tolist())))
        if progress:
            progress()
    return Sensitivity(experts, shared, actives, delta, dense, windows.numel(), fingerprints)
