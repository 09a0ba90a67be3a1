"""Tensor sources: where a checkpoint's tensors live, read lazily by name.

A source knows every tensor's name and shape from file headers alone and reads tensors
only when asked, so reading layer after layer holds only the layers still referenced.
Pickled PyTorch files are read with `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers: no code from a checkpoint ever runs.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from metanet.errors import CheckpointError


class TensorSource(Protocol):
    format: str  # "safetensors" | "pytorch" | "gguf"

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, names: list[str]) -> dict[str, torch.Tensor]: ...


#: safetensors dtype strings → torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in the file
    nbytes: int


class SafetensorsSource:
    """One or many `.safetensors` files (with or without `model.safetensors.index.json`).

    Headers are parsed and checked against the file size up front (so a truncated file is
    caught before any work). A tensor is read with one positional read straight into a
    fresh tensor: unlike a memory map, which keeps every touched page of a shard resident
    for as long as any tensor views it, memory holds exactly the tensors alive.
    """

    format = "safetensors"

    def __init__(self, files: list[Path]):
        self._entries: dict[str, _Entry] = {}
        for file in files:
            self._entries |= _read_header(file)

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
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in names:
            entry = self._entries[name]
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
            buffer = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else bytearray()
            with open(entry.file, "rb") as f:
                f.seek(entry.offset)
                if f.readinto(buffer) != entry.nbytes:
                    raise CheckpointError(f"{entry.file}: truncated while reading tensor {name}")
            tensors[name] = tensor
        return tensors


def _read_header(file: Path) -> dict[str, _Entry]:
    """Parse a safetensors header: u64 little-endian length N, then N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}}, offsets relative to byte 8 + N."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise CheckpointError(f"{file}: not a safetensors file (truncated or corrupt header)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file}: corrupt safetensors header ({_first_line(exc)})") from None
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt or unsupported header entry for tensor {name}: {info}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{file}: header of tensor {name} gives {end - begin} bytes for shape {list(shape)} {info['dtype']}")
        if data_start + end > size:
            raise CheckpointError(f"{file}: truncated: tensor {name} ends at byte {data_start + end:,}, the file has {size:,}")
        entries[name] = _Entry(file, dtype, shape, data_start + begin, nbytes)
    return entries


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
