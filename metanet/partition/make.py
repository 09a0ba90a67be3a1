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

from metanet.checkpoints import Checkpoint, FFNLayer
from metanet.errors import MetanetError
from metanet.model.network import expert_router
from metanet.partition.methods import CALIBRATED_METHODS, METHODS, LayerCalibration, assign_neurons
from metanet.partition.partition import LayerPartition, OperatingPoint, Partition
from metanet.partition.refine import refine_by_coverage
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
    `calib_source` ("text", "generated" or "mix") is recorded in the info of partitions that used it.
    `device`: where the metanetwork runs (its forward pass, assignment and own router; each layer is moved
    there and the results back); baselines and the other routers run on the CPU. Returns router name → Partition.
    """
    names = [resolve_router(method, r) for r in routers]
    expert_width = point.expert_width(checkpoint.d_ff)
    if needs_calibration(method, names) and calibration is None:
        raise MetanetError(f"{method} with router(s) {', '.join(names)} needs calibration text")
    net = layer_metanetwork(metanetwork, method, names, device)
    seconds = dict.fromkeys(["assign", *names], 0.0)
    layers: dict[str, list[LayerPartition]] = {name: [] for name in names}
    fingerprints = []
    for layer in checkpoint.layers():
        calib = calibration[layer.index] if calibration is not None else None
        routed = partition_layer(layer, method, point, names, calib, seed, net, device, seconds=seconds)
        for name in names:
            layers[name].append(routed[name])
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


def layer_metanetwork(metanetwork, method: str, routers: list[str], device: torch.device | str = "cpu"):
    """The metanetwork a partition with `method` and `routers` runs (None when neither is a metanet one): a copy of
    `metanetwork` (None: the shipped network) on `device`, so the caller's network stays where it is."""
    if method not in METANET_METHODS and METANET_ROUTER not in routers:
        return None
    if metanetwork is None:
        from metanet.model.store import load_model

        metanetwork = load_model()
    return copy.deepcopy(metanetwork).to(device)


def partition_layer(
    layer: FFNLayer,
    method: str,
    point: OperatingPoint,
    routers: list[str],
    calib: LayerCalibration | None = None,
    seed: int = 0,
    net=None,
    device: torch.device | str = "cpu",
    refine: bool = False,
    seconds: dict[str, float] | None = None,
) -> dict[str, LayerPartition]:
    """One layer: the assignment of `method`, refined by coverage when `refine` (needs `calib`), then each router fitted on it.

    `net` is the metanetwork (from `layer_metanetwork`) for the metanet methods and router; it runs on `device`.
    `seconds`, when given, accumulates the time spent under "assign" and under each router's name.
    Returns router name → LayerPartition.
    """
    seconds = seconds if seconds is not None else dict.fromkeys(["assign", *routers], 0.0)
    start = time.perf_counter()
    outputs, on_device = None, layer.to(device=device) if net is not None else layer  # the network's copy of the layer
    if net is not None:
        with torch.no_grad():
            outputs = net.neuron_outputs(on_device, calib.stats.to(device) if method == "metanet-data" else None)
    if method in METANET_METHODS:
        assign = net.assign(outputs, point, point.expert_width(layer.d_ff)).cpu()
    else:
        assign = assign_neurons(method, layer, point, calib, seed)
    if refine:
        if calib is None:
            raise MetanetError("coverage refinement needs calibration text (or generated windows)")
        assign = refine_by_coverage(layer, calib.x, assign, point)
    seconds["assign"] += time.perf_counter() - start
    routed = {}
    for name in routers:
        start = time.perf_counter()
        if name == METANET_ROUTER:
            weight, bias = (t.float().cpu() for t in expert_router(on_device, assign.to(device), outputs, point.experts))
        else:
            weight, bias = fit_router(name, layer, assign, point, calib, seed)
        seconds[name] += time.perf_counter() - start
        routed[name] = LayerPartition(assign, weight, bias)
    return routed


def make_partition(checkpoint: Checkpoint, method: str, point: OperatingPoint, router: str | None = None, **kwargs) -> Partition:
    """A single Partition (see make_partitions for the keyword arguments)."""
    return next(iter(make_partitions(checkpoint, method, point, [router], **kwargs).values()))
