"""What a zoo member carries besides its weights: calibration FFN inputs, neuron statistics and
teacher partitions with their measured held-out rel_error.

Files in a member folder (beside config.json, model.safetensors and the tokenizer files):

    calibration/ffn_inputs.safetensors    layers.{i}                  float16 [T, d]  block i's FFN input on the
                                                                                      zoo's calibration windows
    calibration/neuron_stats.safetensors  layers.{i}.activation_rate  float32 [f]     (metanet.calib.neuron_stats,
                                          layers.{i}.mean_abs         float32 [f]      active fraction 0.25)
    teachers/{method}-E{E}-k{k}-s{s}/     Partition folders: TEACHER_METHODS × TEACHER_POINTS, each with the
                                          method's own router, fitted on the calibration inputs
    teachers.json                         {name: {path, method, router, experts, active, shared, rel_error,
                                           oracle_rel_error, mass_recall, router_recall, load_cv,
                                           layers: [rel_error of each layer]}}, measured on the zoo's
                                           held-out windows, so training can pick the best teacher per layer
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from metanet.partition import OperatingPoint

TEACHER_METHODS = ("coact", "cmoe")
#: DESIGN.md's default operating points: 4 of 16 experts; 2 shared + 2 of 14 routed.
TEACHER_POINTS = (OperatingPoint(16, 4, 0), OperatingPoint(16, 4, 2))
FFN_INPUTS = "calibration/ffn_inputs.safetensors"
NEURON_STATS = "calibration/neuron_stats.safetensors"
TEACHERS = "teachers.json"
REPORT_KEYS = ("rel_error", "oracle_rel_error", "mass_recall", "router_recall", "load_cv")
#: How many times `write_member_cache` calls progress: capture, statistics, then once per teacher method.
CACHE_STAGES = 2 + len(TEACHER_METHODS)


def teacher_name(method: str, point: OperatingPoint) -> str:
    return f"{method}-E{point.experts}-k{point.active}-s{point.shared}"


def write_member_cache(
    folder: Path,
    model: torch.nn.Module,
    calibration_ids: torch.LongTensor,
    heldout_ids: torch.LongTensor,
    source: str,
    progress: Callable[[str], None] = lambda stage: None,
) -> dict[str, dict]:
    """Write the caches of the checkpoint saved in `folder` (whose weights `model` holds) and return teachers.json's content.

    calibration_ids [Nc, S] feed the cached inputs, statistics and the teachers; heldout_ids [Nh, S]
    measure the teachers. `source` is recorded in each Partition as the checkpoint it belongs to.
    `progress(stage)` is called CACHE_STAGES times, after each stage.
    """
    from safetensors.torch import save_file

    from metanet.calib import TextSplit, capture_ffn_inputs
    from metanet.checkpoints import open_checkpoint
    from metanet.eval.evaluate import evaluate
    from metanet.partition.make import make_partition
    from metanet.partition.methods import layer_calibrations

    checkpoint = open_checkpoint(folder)
    family = checkpoint.family.name
    model.eval()
    start = time.perf_counter()
    inputs = capture_ffn_inputs(model, family, calibration_ids)  # every layer [Nc·S, d] float32
    calib_seconds = time.perf_counter() - start
    heldout = TextSplit("heldout", heldout_ids, capture_ffn_inputs(model, family, heldout_ids), 0.0)
    progress("capture")

    calibration = layer_calibrations(checkpoint.layers(), inputs.layers)
    stats = {}
    for index, calib in calibration.items():
        stats[f"layers.{index}.activation_rate"] = calib.stats.activation_rate.contiguous()
        stats[f"layers.{index}.mean_abs"] = calib.stats.mean_abs.contiguous()
    (folder / "calibration").mkdir()
    save_file({f"layers.{i}": x.half().contiguous() for i, x in inputs.layers.items()}, folder / FFN_INPUTS)
    save_file(stats, folder / NEURON_STATS)
    progress("statistics")

    teachers = {}
    for method in TEACHER_METHODS:
        for point in TEACHER_POINTS:
            partition = make_partition(checkpoint, method, point, calibration=calibration,
                                       calib_tokens=inputs.n_tokens, calib_seconds=calib_seconds)
            partition.source = source
            name = teacher_name(method, point)
            partition.save(folder / "teachers" / name)
            report = evaluate(checkpoint, partition, heldout)
            teachers[name] = {
                "path": f"teachers/{name}", "method": method, "router": partition.router,
                "experts": point.experts, "active": point.active, "shared": point.shared,
                **{key: report[key] for key in REPORT_KEYS},
                "layers": [row["rel_error"] for row in report["layers"]],
            }
        progress(f"{method} teachers")
    (folder / TEACHERS).write_text(json.dumps(teachers, indent=2))
    return teachers


def load_ffn_inputs(folder: str | Path) -> dict[int, torch.Tensor]:
    """Block index → cached calibration FFN inputs X [T, d] float16."""
    from safetensors.torch import load_file

    tensors = load_file(Path(folder) / FFN_INPUTS)
    return {int(key.split(".")[1]): x for key, x in tensors.items()}


def load_neuron_stats(folder: str | Path) -> dict[int, dict[str, torch.Tensor]]:
    """Block index → {"activation_rate": [f], "mean_abs": [f]} (float32)."""
    from safetensors.torch import load_file

    stats: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(Path(folder) / NEURON_STATS).items():
        _, index, name = key.split(".")
        stats.setdefault(int(index), {})[name] = value
    return stats


def load_teachers(folder: str | Path) -> dict[str, dict]:
    """teachers.json of a member: teacher name → its facts and measured rel_error (see the module docstring)."""
    return json.loads((Path(folder) / TEACHERS).read_text())
