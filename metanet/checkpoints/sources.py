"""Tensor sources: where a checkpoint's tensors live, read lazily by name.

A source knows every tensor's name and shape from file headers alone and reads tensors
only when asked. Safetensors files are opened (memory-mapped) per read and closed
again, so reading layer after layer never keeps earlier layers' pages resident.
Pickled PyTorch files are read with `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers: no code from a checkpoint ever runs.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Protocol

import torch

from metanet.errors import CheckpointError


class TensorSource(Protocol):
    format: str  # "safetensors" | "pytorch" | "gguf"

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, names: list[str]) -> dict[str, torch.Tensor]: ...


class SafetensorsSource:
    """One or many `.safetensors` files (with or without `model.safetensors.index.json`)."""

    format = "safetensors"

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in handle.keys():
                        self._file_of[name] = file
                        self._shapes[name] = tuple(handle.get_slice(name).get_shape())
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {_first_line(exc)}") from None

    @classmethod
    def from_index(cls, index_file: Path) -> SafetensorsSource:
        """Sharded checkpoint: every shard named in the index's weight_map must exist."""
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_file}: broken safetensors index ({_first_line(exc)})") from None
        shards = sorted({index_file.parent / shard for shard in weight_map.values()})
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise CheckpointError(f"{index_file}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return cls(shards)

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file_of[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in file_names:
                        tensors[name] = handle.get_tensor(name)
            except Exception as exc:
                raise CheckpointError(f"{file}: cannot read tensors (truncated or corrupt?): {_first_line(exc)}") from None
        return tensors


class PickleSource:
    """PyTorch `.bin` / `.pt` state dicts, loaded with `weights_only=True` (never arbitrary unpickling)."""

    format = "pytorch"

    def __init__(self, files: list[Path]):
        self._tensors: dict[str, torch.Tensor] = {}
        for file in files:
            self._tensors |= self._load(file)

    @staticmethod
    def _load(file: Path) -> dict[str, torch.Tensor]:
        try:
            try:  # memory-mapped when the file is in the zip format torch.save writes
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{file}: refused: the pickle holds Python objects beyond tensors and could run code "
                f"(torch.load weights_only=True said: {_first_line(exc)}); convert it to safetensors with a trusted tool"
            ) from None
        except Exception as exc:
            raise CheckpointError(f"{file}: not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(exc)}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{file}: expected a state dict of tensors, found {type(state).__name__}")
        return state

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self._tensors[name] for name in names}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
