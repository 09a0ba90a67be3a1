"""The canonical feed-forward layer every supported family maps onto.

    y = w_out · ( act(w_in·x + b_in) ⊙ (w_gate·x) ) + b_out        (gated: LLaMA, Mistral, Qwen2)
    y = w_out ·   act(w_in·x + b_in)                + b_out        (GPT-2, BERT, OPT, GPT-NeoX)

x is the FFN's input, i.e. the output of `norm` (the normalisation that feeds the FFN).
For gated families `w_in` is the *activated* projection (LLaMA's gate_proj) and `w_gate`
the linear multiplier (LLaMA's up_proj), as in DESIGN.md's formula.
Hidden neuron j owns row j of w_in / w_gate, entry j of b_in and column j of w_out.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Canonical activation names → functions. Families translate their config strings
#: (`gelu_new`, `gelu_pytorch_tanh`, `swish`, …) to these names.
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact, erf-based
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}

#: Activations with act(c·z) = c·act(z) for c > 0: rescaling a neuron (row × c,
#: column ÷ c) leaves such an FFN's function unchanged.
POSITIVELY_HOMOGENEOUS = frozenset({"relu"})


@dataclass
class Norm:
    """The normalisation whose output is the FFN input.

    layernorm: (h − mean(h)) / sqrt(var(h) + eps) · weight + bias
    rmsnorm:   h / sqrt(mean(h²) + eps) · weight
    """

    kind: str  # "layernorm" | "rmsnorm"
    weight: torch.Tensor  # [d]
    bias: torch.Tensor | None  # [d], None for rmsnorm
    eps: float

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [..., d] → [..., d]
        if self.kind == "layernorm":
            return F.layer_norm(h, (h.shape[-1],), self.weight, self.bias, self.eps)
        variance = h.float().pow(2).mean(-1, keepdim=True)
        return (h.float() * torch.rsqrt(variance + self.eps)).to(h.dtype) * self.weight


@dataclass
class FFNLayer:
    """One transformer block's FFN in canonical form (see the module docstring)."""

    w_in: torch.Tensor  # [f, d]
    w_out: torch.Tensor  # [d, f]
    activation: str  # a key of ACTIVATIONS
    w_gate: torch.Tensor | None = None  # [f, d]
    b_in: torch.Tensor | None = None  # [f]
    b_out: torch.Tensor | None = None  # [d]
    norm: Norm | None = None
    index: int = 0  # block index in the source model
    family: str = ""  # adapter name, e.g. "llama"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")

    @property
    def d_model(self) -> int:
        return self.w_in.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w_in.shape[0]

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors of the layer by canonical name (norm tensors as `norm.weight`, `norm.bias`)."""
        named = {"w_in": self.w_in, "w_gate": self.w_gate, "w_out": self.w_out, "b_in": self.b_in, "b_out": self.b_out}
        if self.norm is not None:
            named |= {"norm.weight": self.norm.weight, "norm.bias": self.norm.bias}
        return {name: t for name, t in named.items() if t is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def n_params(self) -> int:
        """FFN parameters (projections and biases; the norm belongs to the block)."""
        return sum(t.numel() for name, t in self.tensors().items() if not name.startswith("norm."))

    def fingerprint(self) -> str:
        """blake2b of the projection weights as float32 bytes: ties a partition to the layer it was made for."""
        digest = hashlib.blake2b(digest_size=16)
        for t in (self.w_in, self.w_gate, self.w_out):
            if t is not None:
                digest.update(t.detach().to(device="cpu", dtype=torch.float32).contiguous().view(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden activations a = act(w_in·x + b_in) ⊙ (w_gate·x).   x: [..., d] → a: [..., f]"""
        a = ACTIVATIONS[self.activation](F.linear(x, self.w_in, self.b_in))
        if self.w_gate is not None:
            a = a * F.linear(x, self.w_gate)
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = w_out·a + b_out.   x: [..., d] (already normalised) → y: [..., d]"""
        return F.linear(self.hidden(x), self.w_out, self.b_out)

    def permute_hidden(self, perm: torch.Tensor) -> FFNLayer:
        """The same function with hidden neuron perm[j] moved to position j.   perm: [f]"""
        return dataclasses.replace(
            self,
            w_in=self.w_in[perm],
            w_gate=None if self.w_gate is None else self.w_gate[perm],
            b_in=None if self.b_in is None else self.b_in[perm],
            w_out=self.w_out[:, perm],
        )

    def to(self, *args, **kwargs) -> FFNLayer:
        """The same layer with `tensor.to(*args, **kwargs)` applied to every tensor: a dtype, a device or both
        (Lightning moves training samples to the accelerator through this)."""
        cast = lambda t: None if t is None else t.to(*args, **kwargs)  # noqa: E731
        norm = self.norm and dataclasses.replace(self.norm, weight=cast(self.norm.weight), bias=cast(self.norm.bias))
        return dataclasses.replace(
            self, w_in=cast(self.w_in), w_gate=cast(self.w_gate), w_out=cast(self.w_out),
            b_in=cast(self.b_in), b_out=cast(self.b_out), norm=norm,
        )

    def check_shapes(self) -> None:
        """Raise ValueError naming the first tensor whose shape disagrees with d and f."""
        f, d = self.w_in.shape
        expected = {"w_gate": (f, d), "w_out": (d, f), "b_in": (f,), "b_out": (d,), "norm.weight": (d,), "norm.bias": (d,)}
        for name, tensor in self.tensors().items():
            if name in expected and tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name} has shape {list(tensor.shape)}, expected {list(expected[name])} (d={d}, f={f})")

    def __repr__(self) -> str:
        kind = "gated " if self.gated else ""
        return f"FFNLayer(index={self.index}, family={self.family!r}, d={self.d_model}, f={self.d_ff}, {kind}{self.activation})"

