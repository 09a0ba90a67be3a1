"""The conversion pipeline: calibrate → partition → route → compensate, block after block (DESIGN.md "Data flow").

For block ℓ = 0, 1, …, L−1 in order:

    x_ℓ        the FFN inputs of the calibration windows, taken in the model whose blocks < ℓ are
               already converted (`sequential`, the default: the inputs block ℓ will meet at run time)
               or in the dense model
    assign     the method's partition of the neurons (`metanet.partition.make.partition_layer`),
               refined by coverage on x_ℓ (`refine`, metanet.partition.refine)
    router     the router fitted on that assignment (on x_ℓ where it needs data)
    w_out, b   the down projection and output bias refitted by least squares given the router's
               selection on x_ℓ (`compensate`, metanet.conversion.compensate)

then block ℓ's MoE goes into the walked model, and the walk moves on. Data-free settings (a data-free
method and router, no refinement, no compensation) need no model and no text at all.
The result is a Partition: compensated layers carry their refitted down projection, and with a
per-block plan every layer its own operating point.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from metanet.calib import calibration_windows, neuron_stats
from metanet.checkpoints import Checkpoint
from metanet.conversion.blocks import BlockWalk
from metanet.conversion.compensate import DEFAULT_RIDGE, refit_down_projection
from metanet.errors import MetanetError
from metanet.moe.convert import install_block
from metanet.moe.module import MoEFFN
from metanet.moe.routing import select_experts
from metanet.partition.make import layer_metanetwork, needs_calibration, partition_layer, resolve_router
from metanet.partition.methods import LayerCalibration
from metanet.partition.partition import OperatingPoint, Partition

log = logging.getLogger(__name__)


@dataclass
class ConversionSettings:
    """What `convert_checkpoint` does (module docstring). The defaults are the best pipeline measured on SmolLM2
    (benchmarks/results/real-llm.md)."""

    method: str = "cmoe"
    router: str | None = "lsq"  # None: the method's own
    point: OperatingPoint = field(default_factory=lambda: OperatingPoint(16, 8))
    plan: list[OperatingPoint] | None = None  # one operating point per block; None: `point` everywhere
    calibration: str = "mix"  # text | generated | mix (metanet.calib.calibration_windows)
    calib_tokens: int = 16384
    sequential: bool = True
    refine: bool = True
    compensate: bool = True
    ridge: float = DEFAULT_RIDGE
    output_bias: bool = True  # compensation fits an output bias b_out too; False: the down projection alone (what --format transformers can hold)
    seed: int = 0

    def point_of(self, index: int) -> OperatingPoint:
        return self.plan[index] if self.plan is not None else self.point

    @property
    def uses_data(self) -> bool:
        """Whether any stage runs the model on calibration windows."""
        return needs_calibration(self.method, [resolve_router(self.method, self.router)]) or self.refine or self.compensate

    def techniques(self) -> dict:
        """The settings a Partition's info records beside method and router."""
        return {key: value for key, value in asdict(self).items() if key in ("sequential", "refine", "compensate", "ridge", "output_bias")}


def convert_checkpoint(
    checkpoint: Checkpoint,
    settings: ConversionSettings,
    model=None,
    tokenizer=None,
    corpus: list[str] | None = None,
    metanetwork=None,
    device: torch.device | str = "cpu",
    progress: Callable[[], None] | None = None,
) -> Partition:
    """The Partition of `checkpoint` the module docstring describes; `progress()` is called after each block.

    `model`, `tokenizer` (from `metanet.calib.load_model_and_tokenizer`) and `corpus` (documents, for text and mix
    calibration) are needed when `settings.uses_data`; `metanetwork` for the metanet methods and router (None: the
    shipped one). The dense `model` is left as it was: the sequential walk runs a copy of it.
    """
    start = time.perf_counter()
    router = resolve_router(settings.method, settings.router)
    points = [settings.point_of(i) for i in range(checkpoint.n_layers)]
    for point in points:
        point.expert_width(checkpoint.d_ff)  # MetanetError for a point that does not split this model's layers
    if settings.plan is not None and len(settings.plan) != checkpoint.n_layers:
        raise MetanetError(f"the plan has {len(settings.plan)} blocks, the model {checkpoint.n_layers}")
    walk, walked, calib_tokens = None, None, 0
    if settings.uses_data:
        if model is None:
            raise MetanetError(f"{settings.method}/{router} with refinement or compensation runs the model on calibration windows: pass the model")
        family = checkpoint.family.name
        windows = calibration_windows(model, tokenizer, family, settings.calib_tokens, corpus, settings.calibration, settings.seed)
        walked = copy.deepcopy(model) if settings.sequential else model
        walk = BlockWalk(walked, family, windows)
        calib_tokens = windows.numel()
    net = layer_metanetwork(metanetwork, settings.method, [router], device)
    layers, fingerprints = [], []
    for layer in checkpoint.layers():
        i, point = layer.index, points[layer.index]
        calib = None
        if walk is not None:
            x = walk.ffn_inputs()  # [T, d]
            calib = LayerCalibration(x, neuron_stats(layer, x))
        lp = partition_layer(layer, settings.method, point, [router], calib, settings.seed, net, device, refine=settings.refine)[router]
        if settings.compensate:
            mask = select_experts(lp.scores(calib.x), point)  # [T, E]
            fitted = refit_down_projection(layer, calib.x, lp.assign, mask, settings.ridge, bias=settings.output_bias)
            lp.w_out, lp.b_out = fitted.w_out, fitted.b_out
        if settings.plan is not None and point != settings.point:
            lp.point = point
        if walk is not None:
            if settings.sequential:
                moe = MoEFFN.from_layer(layer, lp, point).to(next(walked.parameters()).device)
                install_block(walked, checkpoint.family.name, i, moe)
            walk.advance(rerun=settings.sequential)
        layers.append(lp)
        fingerprints.append(layer.fingerprint())
        if progress:
            progress()
    info = {"seed": settings.seed, "convert_s": round(time.perf_counter() - start, 3), "calib_tokens": calib_tokens,
            **({"calib_source": settings.calibration} if settings.uses_data else {}), **settings.techniques()}
    log.info("converted %d blocks with %s/%s in %.1f s", len(layers), settings.method, router, info["convert_s"])
    return Partition(settings.method, router, settings.point, settings.point.expert_width(checkpoint.d_ff), layers, fingerprints,
                     str(checkpoint.path), info)
