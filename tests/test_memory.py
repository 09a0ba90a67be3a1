"""Reading is lazy: iterating the layers of a large checkpoint holds about two layers in memory."""

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

D_MODEL, D_FF, N_LAYERS = 1024, 4096, 8  # 48 MiB of float32 FFN weights per layer, 384 MiB in all

# Peak resident memory (VmHWM) is reset after start-up through /proc/self/clear_refs, so the
# import of torch cannot hide the growth. argv[2] == "eager" keeps every layer: the control run.
MEASURE = """
import re, sys
from metanet.checkpoints import open_checkpoint

def peak_rss():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

ckpt = open_checkpoint(sys.argv[1])
kept = []
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = peak_rss()
for layer in ckpt.layers():
    layer_bytes = layer.nbytes
    if sys.argv[2] == "eager":
        kept.append(layer)
print(peak_rss() - before, layer_bytes)
"""


def write_synthetic_llama(folder):
    """A gated 8-layer checkpoint in two shards with an index, FFN and norm tensors only."""
    folder.mkdir()
    config = {"model_type": "llama", "hidden_size": D_MODEL, "intermediate_size": D_FF, "num_hidden_layers": N_LAYERS, "rms_norm_eps": 1e-6}
    (folder / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for shard in range(2):
        tensors = {}
        for i in range(shard * N_LAYERS // 2, (shard + 1) * N_LAYERS // 2):
            p = f"model.layers.{i}."
            tensors[p + "mlp.gate_proj.weight"] = torch.randn(D_FF, D_MODEL)
            tensors[p + "mlp.up_proj.weight"] = torch.randn(D_FF, D_MODEL)
            tensors[p + "mlp.down_proj.weight"] = torch.randn(D_MODEL, D_FF)
            tensors[p + "post_attention_layernorm.weight"] = torch.ones(D_MODEL)
        name = f"model-{shard + 1:05d}-of-00002.safetensors"
        save_file(tensors, folder / name)
        weight_map |= dict.fromkeys(tensors, name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def peak_growth(folder, mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), mode], capture_output=True, text=True, check=True).stdout
    growth, layer_bytes = map(int, out.split())
    return growth, layer_bytes


def test_iterating_layers_grows_peak_memory_by_less_than_three_layers(tmp_path):
    folder = tmp_path / "big"
    write_synthetic_llama(folder)
    growth, layer_bytes = peak_growth(folder, "lazy")
    assert layer_bytes == 3 * D_FF * D_MODEL * 4 + D_MODEL * 4
    assert growth < 3 * layer_bytes, f"peak RSS grew by {growth / 2**20:.0f} MiB, {growth / layer_bytes:.1f} layers"
    # The measurement sees memory: keeping every layer shows up as (nearly) all eight.
    eager_growth, _ = peak_growth(folder, "eager")
    assert eager_growth > 6 * layer_bytes
