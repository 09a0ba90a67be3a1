"""Small helpers shared by tests."""

import shutil

import torch
from safetensors.torch import load_file, save_file


def retrained_copy(folder, destination):
    """A copy of a checkpoint folder with one FFN weight nudged: same shapes, other weights."""
    shutil.copytree(folder, destination)
    file = destination / "model.safetensors"
    state = load_file(file)
    name = next(k for k in state if "mlp" in k and k.endswith("weight"))
    state[name] = state[name] + 1e-3 * torch.randn_like(state[name])
    save_file(state, file, metadata={"format": "pt"})
    return destination
