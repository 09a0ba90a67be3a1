"""Which torch device a command runs on: `--device auto|cpu|cuda` of `metanet bench` and `metanet predict`."""

from __future__ import annotations

import torch

from metanet.errors import MetanetError


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when there is one, else cpu; "cuda" without a GPU is a MetanetError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise MetanetError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise MetanetError("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False)")
    return torch.device(device)
