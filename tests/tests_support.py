"""Small helpers shared by tests."""

import shutil

import torch
from safetensors.torch import load_file, save_file

from metanet.partition import LayerPartition, OperatingPoint, Partition


def retrained_copy(folder, destination):
    """A copy of a checkpoint folder with one FFN weight nudged: same shapes, other weights."""
    shutil.copytree(folder, destination)
    file = destination / "model.safetensors"
    state = load_file(file)
    name = next(k for k in state if "mlp" in k and k.endswith("weight"))
    state[name] = state[name] + 1e-3 * torch.randn_like(state[name])
    save_file(state, file, metadata={"format": "pt"})
    return destination


WIDTH = 8  # every tiny model's d_ff is a multiple of 8: E = d_ff / 8 experts of width 8


def make_point(d_ff: int, active: int | None = None, shared: int = 0) -> OperatingPoint:
    experts = d_ff // WIDTH
    return OperatingPoint(experts, experts if active is None else active, shared, width_multiple=WIDTH)


def random_partition(layers, point: OperatingPoint, seed: int = 0) -> Partition:
    """Balanced random assignment (each expert exactly f/E neurons) and a random router per layer."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for layer in layers:
        assign = torch.randperm(layer.d_ff, generator=g) % point.experts  # [f]
        parts.append(LayerPartition(assign, torch.randn(point.experts, layer.d_model, generator=g), torch.randn(point.experts, generator=g)))
    return Partition(
        method="random", router="random", point=point, expert_width=point.expert_width(layers[0].d_ff),
        layers=parts, fingerprints=[layer.fingerprint() for layer in layers],
    )


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_one_line_error(result, expected: str):
    """A CLI result that failed on bad input: exit code 2 and one `error:` line on stderr naming `expected`."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and expected in lines[0], lines[0]
