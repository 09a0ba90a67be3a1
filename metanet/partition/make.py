"""Compute Partitions for a whole checkpoint: one method, one or several routers, every layer.

Methods: the baselines of metanet.partition.methods, and the metanetwork's two modes
  metanet        data-free: the layer's weights only, one forward pass per layer
  metanet-data   data-aware: the neuron statistics of calibration text as extra node features
Routers: those of metanet.partition.routers, and `metanet` (the metanetwork's router head, which
can route any partition). Both metanet modes default to the `metanet` router.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Callable

import torch

from metanet.checkpoints import Checkpoint
from metanet.errors import MetanetError
from metanet.model.network import expert_router
from metanet.partition.methods import CALIBRATED_METHODS, METHODS, LayerCalibration, assign_neurons
from metanet.partition.partition import LayerPartition, OperatingPoint, Partition
from metanet.partition.routers import CALIBRATED_ROUTERS, DEFAULT_ROUTER, check_router, fit_router

METANET_METHODS = ("metanet", "metanet-data")
ALL_METHODS = METHODS + METANET_METHODS
METANET_ROUTER = "metanet"

log = logging.getLogger(__name__)


def resolve_router(method: str, router: str | None) -> str:
    """The router to use (the method's default when None); clear errors for unknown names."""
    if method not in ALL_METHODS:
        raise MetanetError(f"unknown partition method {method!r}; choose one of {', '.join(ALL_METHODS)}")
    router = router or (METANET_ROUTER if method in METANET_METHODS else DEFAULT_ROUTER[method])
    if router != METANET_ROUTER:
        check_router(router)
    return router


def needs_calibration(method: str, routers: list[str]) -> bool:
    return method in CALIBRATED_METHODS or method == "metanet-data" or any(r in CALIBRATED_ROUTERS for r in routers)


def make_partitions(
    checkpoint: Checkpoint,
    method: str,
    point: OperatingPoint,
    routers: list[str | None],
    calibration: dict[int, LayerCalibration] | None = None,
    seed: int = 0,
    calib_tokens: int = 0,
    calib_seconds: float = 0.0,
    progress: Callable[[], None] | None = None,
    metanetwork=None,
    calib_source: str = "text",
    device: torch.device | str = "cpu",
) -> dict[str, Partition]:
    """One neuron assignment per layer with `method`, then each router fitted on it.

    `calibration` maps layer index → LayerCalibration and is required when the method or a
    router is data-driven. convert_s of each partition = assignment time + its router's
    time + `calib_seconds` (the time spent producing the calibration data) when it used data.
    `calib_source` ("text" or "generated") is recorded in the info of partitions that used it.
    `device`: where the metanetwork runs (its forward pass, assignment and own router; each layer is moved
    there and the results back); baselines and the other routers run on the CPU. Returns router name → Partition.
    """
    names = [resolve_router(method, r) for r in routers]
    expert_width = point.expert_width(checkpoint.d_ff)
    if needs_calibration(method, names) and calibration is None:
        raise MetanetError(f"{method} with router(s) {', '.join(names)} needs calibration text")
    net = _metanetwork(metanetwork) if method in METANET_METHODS or METANET_ROUTER in names else None
    if net is not None:
        net = copy.deepcopy(net).to(device)  # a copy: the caller's network stays where it is
    seconds = dict.fromkeys(["assign", *names], 0.0)
    layers: dict[str, list[LayerPartition]] = {name: [] for name in names}
    fingerprints = []
    for layer in checkpoint.layers():
        calib = calibration[layer.index] if calibration is not None else None
        start = time.perf_counter()
        outputs, on_device = None, layer.to(device=device) if net is not None else layer  # the network's copy of the layer
        if net is not None:
            with torch.no_grad():
                outputs = net.neuron_outputs(on_device, calib.stats.to(device) if method == "metanet-data" else None)
        if method in METANET_METHODS:
            assign = net.assign(outputs, point, expert_width).cpu()
        else:
            assign = assign_neurons(method, layer, point, calib, seed)
        seconds["assign"] += time.perf_counter() - start
        for name in names:
            start = time.perf_counter()
            if name == METANET_ROUTER:
                weight, bias = (t.float().cpu() for t in expert_router(on_device, assign.to(device), outputs, point.experts))
            else:
                weight, bias = fit_router(name, layer, assign, point, calib, seed)
            seconds[name] += time.perf_counter() - start
            layers[name].append(LayerPartition(assign, weight, bias))
        fingerprints.append(layer.fingerprint())
        if progress:
            progress()
    partitions = {}
    for name in names:
        uses_data = needs_calibration(method, [name])
        convert_s = seconds["assign"] + seconds[name] + (calib_seconds if uses_data else 0.0)
        info = {"seed": seed, "convert_s": round(convert_s, 3), "calib_tokens": calib_tokens if uses_data else 0,
                **({"calib_source": calib_source} if uses_data else {})}
        partitions[name] = Partition(method, name, point, expert_width, layers[name], fingerprints, str(checkpoint.path), info)
        log.info("%s/%s partition of %d layers in %.1f s", method, name, len(fingerprints), convert_s)
    return partitions


def _metanetwork(net):
    from metanet.model.store import load_model

    return net if net is not None else load_model()


def make_partition(checkpoint: Checkpoint, method: str, point: OperatingPoint, router: str | None = None, **kwargs) -> Partition:
    """A single Partition (see make_partitions for the keyword arguments)."""
    return next(iter(make_partitions(checkpoint, method, point, [router], **kwargs).values()))
