"""MoEFFN: one dense FFN layer carved into E experts of m hidden neurons each, with a linear router.

Expert e owns the hidden neurons j with assign[j] = e (in increasing j) and computes

    y_e(x) = W_out[e] · ( act(W_in[e]·x + b_in[e]) ⊙ (W_gate[e]·x) )        (gated families)
    y_e(x) = W_out[e] ·   act(W_in[e]·x + b_in[e])                          (the others)

A token x runs the experts in  S(x) = {0..s−1} ∪ top_{k−s} over routed e of  x·router_weight[e] + router_bias[e]
(`metanet.moe.routing.select_experts`), and the layer returns the unweighted sum

    y(x) = Σ_{e∈S(x)} y_e(x) + b_out.

The experts are carved out of the dense FFN, so with k = E this *is* the dense FFN
(up to summation order), and with k < E it equals `metanet.moe.routing.moe_forward`.

Both forwards run on the path `self.kernel` names ("auto": `metanet.kernels.choose_path`
picks per call — reference under autograd, grouped on CPU; on CUDA the Triton decode
kernels, a grouped GEMM or the masked dense FFN); sums accumulate in float32.

Storage is grouped and contiguous, the layout a grouped-GEMM kernel and the MoE
checkpoint use:  w_in [E, m, d], w_gate [E, m, d] (gated only), w_out [E, d, m],
b_in [E, m] (if the layer has it), b_out [d] (if any), router_weight [E, d],
router_bias [E], and `order` [E·m]: the original index of grouped neuron e·m + i.

Padding: `from_layer(..., pad_to=64)` rounds the expert width up to a multiple of 64
for GPU kernels. A pad neuron has zero rows in w_in / w_gate, zero b_in, a zero column
in w_out and order −1: it adds exactly nothing to y_e(x), and `assign` / `to_ffn_layer`
leave it out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metanet.checkpoints import ACTIVATIONS, FFNLayer
from metanet.errors import MetanetError
from metanet.kernels import moe_output
from metanet.moe.routing import select_experts
from metanet.partition.partition import LayerPartition, OperatingPoint


class MoEFFN(nn.Module):
    """y(x) = Σ_{e∈S(x)} y_e(x) + b_out with router-selected experts S(x) (see the module docstring)."""

    def __init__(
        self,
        w_in: torch.Tensor,  # [E, m, d]
        w_out: torch.Tensor,  # [E, d, m]
        router_weight: torch.Tensor,  # [E, d]
        router_bias: torch.Tensor,  # [E]
        order: torch.Tensor,  # [E·m] int64, original neuron index of each grouped neuron, −1 for a pad neuron
        point: OperatingPoint,
        activation: str,
        w_gate: torch.Tensor | None = None,  # [E, m, d]
        b_in: torch.Tensor | None = None,  # [E, m]
        b_out: torch.Tensor | None = None,  # [d]
        index: int = 0,
        family: str = "",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise MetanetError(f"unknown activation {activation!r}; known: {', '.join(sorted(ACTIVATIONS))}")
        n_experts, m, d = w_in.shape
        expected = {
            "w_in": (n_experts, m, d), "w_gate": (n_experts, m, d), "w_out": (n_experts, d, m),
            "b_in": (n_experts, m), "b_out": (d,), "router_weight": (n_experts, d), "router_bias": (n_experts,),
            "order": (n_experts * m,),
        }
        given = {"w_in": w_in, "w_gate": w_gate, "w_out": w_out, "b_in": b_in, "b_out": b_out,
                 "router_weight": router_weight, "router_bias": router_bias, "order": order}
        for name, tensor in given.items():
            if tensor is not None and tuple(tensor.shape) != expected[name]:
                raise MetanetError(f"MoEFFN {name} has shape {list(tensor.shape)}, expected {list(expected[name])} (E={n_experts}, m={m}, d={d})")
        if point.experts != n_experts:
            raise MetanetError(f"operating point has E={point.experts} experts, the weights have {n_experts}")
        self.point = point
        self.activation = activation
        self.index = index
        self.family = family
        for name, tensor in given.items():  # absent ones (w_gate, b_in, b_out) registered as None, so weights() names them all
            if name != "order":
                self.register_parameter(name, None if tensor is None else nn.Parameter(tensor.contiguous()))
        self.kernel = "auto"  # runtime path of forward: "auto" or one of metanet.kernels.PATHS
        self.decode_tiling = None  # block sizes of the decode path's kernels (metanet.kernels.decode.Tiling); None: their defaults
        self.register_buffer("order", order.to(device=w_in.device, dtype=torch.int64).contiguous())

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_layer(cls, layer: FFNLayer, layer_partition: LayerPartition, point: OperatingPoint, pad_to: int = 1) -> MoEFFN:
        """Group `layer`'s hidden neurons by `layer_partition.assign` into E = point.experts experts of equal width.

        A compensated layer partition brings its own down projection and output bias
        (`LayerPartition.carve`): the experts are carved from the layer with them in place.
        Each expert's width m = f/E is rounded up to a multiple of `pad_to` with pad
        neurons (module docstring). Tensors keep the layer's dtype and device (the router
        is cast to them); the layer itself is not modified.
        """
        layer = layer_partition.carve(layer)
        f, d = layer.d_ff, layer.d_model
        m = point.expert_width(f)  # MetanetError unless E splits f evenly
        n_experts = point.experts
        assign = layer_partition.assign
        if tuple(assign.shape) != (f,):
            raise MetanetError(f"layer {layer.index}: assign has shape {list(assign.shape)}, expected [{f}] (one expert id per hidden neuron)")
        assign = assign.to(device="cpu", dtype=torch.int64)
        if f and (assign.min() < 0 or assign.max() >= n_experts):
            raise MetanetError(f"layer {layer.index}: assign has expert ids outside 0..{n_experts - 1}")
        sizes = torch.bincount(assign, minlength=n_experts)
        if not bool((sizes == m).all()):
            raise MetanetError(f"layer {layer.index}: experts must all have width {m} (d_ff={f} / E={n_experts}); sizes are {sizes.tolist()}")
        for name, tensor, shape in (("router weight", layer_partition.router_weight, (n_experts, d)),
                                    ("router bias", layer_partition.router_bias, (n_experts,))):
            if tuple(tensor.shape) != shape:
                raise MetanetError(f"layer {layer.index}: {name} has shape {list(tensor.shape)}, expected {list(shape)} (E={n_experts}, d={d})")

        if pad_to < 1:
            raise MetanetError(f"pad_to must be ≥ 1, got {pad_to}")
        device, dtype = layer.w_in.device, layer.w_in.dtype
        order = torch.argsort(assign, stable=True).to(device)  # [f]: expert 0's neurons in increasing j, then expert 1's, …
        pad = -m % pad_to  # pad neurons appended to each expert
        grouped = lambda t: F.pad(t[order].reshape(n_experts, m, -1), (0, 0, 0, pad))  # noqa: E731   [f, …] → [E, m + pad, …], zeros appended
        return cls(
            w_in=grouped(layer.w_in),
            w_gate=None if layer.w_gate is None else grouped(layer.w_gate),
            w_out=grouped(layer.w_out.T).transpose(1, 2),  # [d, f] → [E, d, m + pad]
            b_in=None if layer.b_in is None else grouped(layer.b_in[:, None])[..., 0],  # [E, m + pad]
            b_out=None if layer.b_out is None else layer.b_out.clone(),
            router_weight=layer_partition.router_weight.to(device=device, dtype=dtype),
            router_bias=layer_partition.router_bias.to(device=device, dtype=dtype),
            order=F.pad(order.reshape(n_experts, m), (0, pad), value=-1).reshape(-1),  # [E·(m + pad)], −1 for pad neurons
            point=point,
            activation=layer.activation,
            index=layer.index,
            family=layer.family,
        )

    # -- shape --------------------------------------------------------------------------
    @property
    def n_experts(self) -> int:
        return self.w_in.shape[0]

    @property
    def expert_width(self) -> int:
        return self.w_in.shape[1]

    @property
    def d_model(self) -> int:
        return self.w_in.shape[2]

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    def weights(self) -> dict[str, torch.Tensor | None]:
        """The parameters by name: w_in, w_gate, w_out, b_in, b_out, router_weight, router_bias (None where the layer has
        none). One dict read, for code that runs on every call (nn.Module's attribute lookup costs ~1 µs a name)."""
        return self._parameters

    def assign(self) -> torch.Tensor:
        """Expert id of each original hidden neuron (pad neurons left out).   → int64 [f]"""
        experts = torch.arange(self.n_experts, device=self.order.device).repeat_interleave(self.expert_width)  # [E·m]
        real = self.order >= 0
        return torch.empty(int(real.sum()), dtype=torch.int64, device=self.order.device).scatter_(0, self.order[real], experts[real])

    # -- routing ------------------------------------------------------------------------
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Router scores x·router_weightᵀ + router_bias, computed in float32.   x: [..., d] → [..., E]"""
        return F.linear(x.float(), self.router_weight.float(), self.router_bias.float())

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Experts each token runs: shared always, then the top k−s routed.   x: [..., d] → bool [..., E]"""
        scores = self.scores(x)
        mask = select_experts(scores.reshape(-1, self.n_experts), self.point)  # [T, E]
        return mask.reshape(scores.shape)

    # -- computing ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = Σ_{e∈S(x)} y_e(x) + b_out with S(x) from the router.   x: [..., d] → y: [..., d]"""
        self._check_input(x)
        return moe_output(self, x.reshape(-1, x.shape[-1]), None, self.kernel).reshape(x.shape)

    def forward_with_mask(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """y = Σ_e mask[t, e] · y_e(x_t) + b_out for any expert selection (oracle routing, ablations).

        x: [..., d], mask: bool [..., E] → y: [..., d]
        """
        self._check_input(x)
        if tuple(mask.shape) != (*x.shape[:-1], self.n_experts):
            raise MetanetError(f"routing mask has shape {list(mask.shape)}, expected {[*x.shape[:-1], self.n_experts]}")
        tokens, mask = x.reshape(-1, self.d_model), mask.reshape(-1, self.n_experts).bool()  # [T, d], [T, E]
        return moe_output(self, tokens, mask, self.kernel).reshape(x.shape)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_model:
            raise MetanetError(f"MoEFFN input has width {x.shape[-1]}, expected d={self.d_model}")

    # -- back to dense ------------------------------------------------------------------
    def to_ffn_layer(self, original_order: bool = False) -> FFNLayer:
        """The dense FFN these experts make up (norm not included: it belongs to the block).

        Neurons come in grouped order (expert 0's, then expert 1's, …), pad neurons left
        out; `original_order=True` applies the inverse of `order`, giving back the source
        layer neuron for neuron.
        """
        d = self.d_model
        real = (self.order >= 0).nonzero().squeeze(1)  # [f] grouped positions of the real neurons
        rows = lambda t: t.detach().reshape(-1, d)[real]  # noqa: E731   [E, m, d] → [f, d]
        layer = FFNLayer(
            w_in=rows(self.w_in),
            w_gate=None if self.w_gate is None else rows(self.w_gate),
            w_out=self.w_out.detach().permute(1, 0, 2).reshape(d, -1)[:, real],  # [E, d, m] → [d, f]
            b_in=None if self.b_in is None else self.b_in.detach().reshape(-1)[real],
            b_out=None if self.b_out is None else self.b_out.detach().clone(),
            activation=self.activation,
            index=self.index,
            family=self.family,
        )
        return layer.permute_hidden(torch.argsort(self.order[real])) if original_order else layer

    def extra_repr(self) -> str:
        p = self.point
        kind = "gated " if self.gated else ""
        return f"layer={self.index}, E={p.experts}, k={p.active}, shared={p.shared}, m={self.expert_width}, d={self.d_model}, {kind}{self.activation}"
