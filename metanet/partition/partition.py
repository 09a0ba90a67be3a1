"""The Partition: which hidden neurons form which expert, and each layer's router.

On disk (a folder, DESIGN.md "Canonical objects"):
    partition.json          method, router, experts E, active k, shared s, expert width,
                            source checkpoint fingerprints, per-layer summary (each layer's own
                            experts / active / shared), run info
    partition.safetensors   layers.{i}.assign         int32 [f]  expert id per neuron, shared experts first
                            layers.{i}.router.weight  [E, d]
                            layers.{i}.router.bias    [E]
                            layers.{i}.w_out          [d, f]  compensated layers only: the refitted down
                            layers.{i}.b_out          [d]     projection (source neuron order) and output bias

Experts 0..s-1 are shared (always active); s..E-1 are routed, and a token uses the k-s
routed experts with the highest router scores  x·router.weight[e] + router.bias[e].

A per-block plan gives layers their own operating point (`LayerPartition.point`); the top-level
experts / active / shared are then the plan's nominal point (the one its budget averages to), used by
every layer without a point of its own. A compensated layer (metanet.conversion.compensate) carries
its refitted down projection: `LayerPartition.carve(layer)` is the source layer with it in place, and
every MoE built from the partition is carved from that.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metanet.atomic import replace_folder
from metanet.checkpoints import FFNLayer
from metanet.errors import MetanetError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class OperatingPoint:
    """E experts in all, the first `shared` of them always active; k active per token, shared included."""

    experts: int
    active: int
    shared: int = 0
    width_multiple: int = 8

    @property
    def routed(self) -> int:
        return self.experts - self.shared

    @property
    def routed_active(self) -> int:
        return self.active - self.shared

    def expert_width(self, d_ff: int) -> int:
        """m = f / E; raises MetanetError unless E splits f into equal experts whose width is a multiple of `width_multiple`."""
        if self.experts < 1 or self.active < 1 or self.shared < 0:
            raise MetanetError(f"experts ({self.experts}) and active ({self.active}) must be ≥ 1 and shared ({self.shared}) ≥ 0")
        if self.active > self.experts:
            raise MetanetError(f"active k={self.active} is more than experts E={self.experts}")
        if self.shared >= self.active and self.shared != self.experts:
            raise MetanetError(f"shared s={self.shared} leaves no routed expert active (k={self.active}); need s < k")
        if d_ff % self.experts or (d_ff // self.experts) % self.width_multiple:
            raise MetanetError(
                f"E={self.experts} does not split d_ff={d_ff} into equal experts whose width is a multiple of "
                f"{self.width_multiple}; choose E dividing {d_ff} with {d_ff}/E a multiple of {self.width_multiple}"
            )
        return d_ff // self.experts


@dataclass
class LayerPartition:
    assign: torch.Tensor  # int64 [f], expert id of each hidden neuron
    router_weight: torch.Tensor  # float32 [E, d]
    router_bias: torch.Tensor  # float32 [E]
    point: OperatingPoint | None = None  # this layer's own operating point (a per-block plan); None: the partition's
    w_out: torch.Tensor | None = None  # float32 [d, f] compensated down projection, source neuron order; None: the layer's own
    b_out: torch.Tensor | None = None  # float32 [d] compensated output bias (only with w_out); None: the layer's own

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Router scores.   x: [T, d] → [T, E]"""
        return x @ self.router_weight.T + self.router_bias

    @property
    def compensated(self) -> bool:
        return self.w_out is not None

    def carve(self, layer: FFNLayer) -> FFNLayer:
        """The source layer the experts are carved from: `layer` itself, or with the compensated down projection and bias."""
        if self.w_out is None:
            return layer
        cast = lambda t: t.to(device=layer.w_out.device, dtype=layer.w_out.dtype)  # noqa: E731
        return dataclasses.replace(layer, w_out=cast(self.w_out), b_out=None if self.b_out is None else cast(self.b_out))


@dataclass
class Partition:
    method: str
    router: str
    point: OperatingPoint
    expert_width: int
    layers: list[LayerPartition]
    fingerprints: list[str]  # FFNLayer.fingerprint() of each source layer
    source: str = ""  # the checkpoint as the user named it
    info: dict = field(default_factory=dict)  # seed, convert_s, calib_tokens, …

    def layer_point(self, index: int) -> OperatingPoint:
        """Layer `index`'s operating point: its own (a plan), else the partition's."""
        return self.layers[index].point or self.point

    @property
    def planned(self) -> bool:
        """Whether some layer runs another operating point than the partition's."""
        return any(self.layer_point(i) != self.point for i in range(len(self.layers)))

    @property
    def compensated(self) -> bool:
        return any(lp.compensated for lp in self.layers)

    def active_fraction(self) -> float:
        """Mean over layers of the share of experts a token runs, k_ℓ / E_ℓ (the FFN parameters it touches, biases aside)."""
        return sum(p.active / p.experts for p in map(self.layer_point, range(len(self.layers)))) / len(self.layers)

    def check_layer_count(self, n_layers: int) -> None:
        """Raise unless the model this partition is applied to has as many FFN layers."""
        if len(self.layers) != n_layers:
            raise MetanetError(
                f"the partition has {len(self.layers)} layers, the model {n_layers}: it was made for another checkpoint ({self.source or 'unknown'})"
            )

    def check_matches(self, layer_index: int, fingerprint: str) -> None:
        """Raise unless this partition was made for a layer with this fingerprint."""
        if layer_index >= len(self.layers):
            raise MetanetError(f"the partition has {len(self.layers)} layers, the checkpoint has more (layer {layer_index})")
        if self.fingerprints[layer_index] != fingerprint:
            raise MetanetError(
                f"the partition was made for another checkpoint ({self.source or 'unknown'}): "
                f"layer {layer_index}'s weights differ from those it was computed on (or were loaded in another dtype)"
            )

    def summary(self) -> list[dict]:
        """Per layer: its operating point, expert sizes (each equal to the layer's expert width), router norm, compensation."""
        rows = []
        for i, lp in enumerate(self.layers):
            point = self.layer_point(i)
            rows.append({
                "index": i, "experts": point.experts, "active": point.active, "shared": point.shared,
                "expert_sizes": torch.bincount(lp.assign, minlength=point.experts).tolist(),
                "router_norm": round(lp.router_weight.norm().item(), 6), "compensated": lp.compensated,
            })
        return rows

    # -- files --------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the folder atomically: built beside it under a temporary name, then renamed over it."""
        from safetensors.torch import save_file

        folder = Path(folder)
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "router": self.router,
            "experts": self.point.experts,
            "active": self.point.active,
            "shared": self.point.shared,
            "width_multiple": self.point.width_multiple,
            "expert_width": self.expert_width,
            "n_layers": len(self.layers),
            "active_fraction": round(self.active_fraction(), 6),
            "source": self.source,
            "fingerprints": self.fingerprints,
            "info": self.info,
            "layers": self.summary(),
        }
        tensors = {}
        for i, lp in enumerate(self.layers):
            tensors[f"layers.{i}.assign"] = lp.assign.to(torch.int32).contiguous()
            tensors[f"layers.{i}.router.weight"] = lp.router_weight.float().contiguous()
            tensors[f"layers.{i}.router.bias"] = lp.router_bias.float().contiguous()
            for name in ("w_out", "b_out"):
                if getattr(lp, name) is not None:
                    tensors[f"layers.{i}.{name}"] = getattr(lp, name).float().contiguous()
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            try:
                save_file(tensors, tmp / "partition.safetensors")
                (tmp / "partition.json").write_text(json.dumps(meta, indent=2))
                replace_folder(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            raise MetanetError(f"cannot write partition to {folder}: {exc.strerror or exc}") from None
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Partition:
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_file, tensor_file = folder / "partition.json", folder / "partition.safetensors"
        if not meta_file.is_file() or not tensor_file.is_file():
            raise MetanetError(f"{folder}: not a partition folder (needs partition.json and partition.safetensors)")
        try:
            meta = json.loads(meta_file.read_text())
            point = OperatingPoint(meta["experts"], meta["active"], meta["shared"], meta["width_multiple"])
            tensors = load_file(tensor_file)
            layers = [
                LayerPartition(
                    tensors[f"layers.{i}.assign"].long(),
                    tensors[f"layers.{i}.router.weight"],
                    tensors[f"layers.{i}.router.bias"],
                    _layer_point(meta["layers"][i] if i < len(meta.get("layers", [])) else {}, point),
                    tensors.get(f"layers.{i}.w_out"),
                    tensors.get(f"layers.{i}.b_out"),
                )
                for i in range(meta["n_layers"])
            ]
            return cls(meta["method"], meta["router"], point, meta["expert_width"], layers, meta["fingerprints"], meta["source"], meta["info"])
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise MetanetError(f"{folder}: broken partition ({type(exc).__name__}: {exc})") from None
        except Exception as exc:  # safetensors' own errors for damaged files
            raise MetanetError(f"{folder}: unreadable partition.safetensors ({str(exc).splitlines()[0]})") from None


def _layer_point(row: dict, nominal: OperatingPoint) -> OperatingPoint | None:
    """A layer's own operating point from its partition.json summary row; None where it is the nominal one (or not stated)."""
    if "active" not in row:
        return None
    point = OperatingPoint(row["experts"], row["active"], row["shared"], nominal.width_multiple)
    return None if point == nominal else point
