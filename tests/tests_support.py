"""Small helpers shared by tests."""

import shutil
import subprocess
import sys
from pathlib import Path

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


#: Loads every folder named on the command line with plain transformers (no metanet import, no trust_remote_code)
#: and saves its float32 logits on the given ids and its greedy continuation of their first row.
PLAIN_TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForCausalLM
ids, new_tokens, out = torch.load(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
results = {}
for folder in sys.argv[4:]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    generated = model.generate(ids[:1], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    results[folder] = (type(model).__name__, logits, generated)
    assert "metanet" not in sys.modules
torch.save(results, out)
"""


def plain_transformers(folders, ids, tmp_path, new_tokens=8) -> dict:
    """{folder: (class name, logits, greedy tokens)} computed in a fresh python process that never imports metanet."""
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(tmp_path / "ids.pt"), str(new_tokens), str(tmp_path / "out.pt"), *map(str, folders)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {Path(key): value for key, value in torch.load(tmp_path / "out.pt").items()}
