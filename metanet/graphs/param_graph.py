"""The parameter graph of one FFN layer.

Nodes: d residual nodes (coordinates of the FFN input/output) and f hidden nodes
(the neurons). Every pair (residual i, hidden j) carries two edges:

    i → j  with features (w_in[j, i], w_gate[j, i]) / s_in       ("reads", 1 or 2 channels)
    j → i  with feature   w_out[i, j] / s_out                      ("writes", 1 channel)

Node features: residual i → (norm weight, norm bias, b_out / s_out); hidden j → b_in / s_in.
The edges are kept as dense [f, d] / [d, f] blocks: a 4096×11008 layer has 90 M edge
pairs, far too many for an edge list, and message passing over them is a dense
product with these blocks. `to_pyg` / `to_networkx` enumerate edges for small layers.

Scale normalisation: s_in and s_out are powers of two near the RMS of the input and
output weights, so dividing by them is exact in floating point and `to_ffn` restores
every weight bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from metanet.atomic import atomic_path
from metanet.checkpoints.ffn_layer import FFNLayer, Norm
from metanet.errors import GraphError

#: Edge counts above which the explicit-edge exports refuse (memory, not correctness).
MAX_PYG_EDGES = 20_000_000
MAX_NETWORKX_EDGES = 1_000_000

RESIDUAL_FEATURES = ("norm_weight", "norm_bias", "b_out")
HIDDEN_FEATURES = ("b_in",)


@dataclass
class ParamGraph:
    edge_in: torch.Tensor  # [f, d]  w_in / s_in
    edge_gate: torch.Tensor | None  # [f, d]  w_gate / s_in
    edge_out: torch.Tensor  # [d, f]  w_out / s_out
    x_residual: torch.Tensor  # [d, 3]  RESIDUAL_FEATURES
    x_hidden: torch.Tensor  # [f, 1]  HIDDEN_FEATURES
    scale_exp_in: int  # s_in = 2**scale_exp_in
    scale_exp_out: int  # s_out = 2**scale_exp_out
    activation: str
    norm_kind: str | None  # None: the layer had no norm
    norm_eps: float
    present: tuple[str, ...]  # which optional tensors the layer had (b_in, b_out, norm.bias)
    index: int = 0
    family: str = ""

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_ffn(cls, layer: FFNLayer, normalize: bool = True) -> ParamGraph:
        inputs = [layer.w_in] if layer.w_gate is None else [layer.w_in, layer.w_gate]
        exp_in = _power_of_two_exponent(inputs) if normalize else 0
        exp_out = _power_of_two_exponent([layer.w_out]) if normalize else 0
        s_in, s_out = 2.0**exp_in, 2.0**exp_out
        d, f = layer.d_model, layer.d_ff
        zeros_d = layer.w_in.new_zeros(d)
        norm = layer.norm
        x_residual = torch.stack(
            [
                norm.weight if norm is not None else torch.ones_like(zeros_d),
                norm.bias if norm is not None and norm.bias is not None else zeros_d,
                layer.b_out / s_out if layer.b_out is not None else zeros_d,
            ],
            dim=1,
        )
        x_hidden = (layer.b_in / s_in if layer.b_in is not None else layer.w_in.new_zeros(f)).unsqueeze(1)
        present = tuple(name for name, t in (("b_in", layer.b_in), ("b_out", layer.b_out)) if t is not None)
        if norm is not None and norm.bias is not None:
            present += ("norm.bias",)
        return cls(
            edge_in=layer.w_in / s_in,
            edge_gate=None if layer.w_gate is None else layer.w_gate / s_in,
            edge_out=layer.w_out / s_out,
            x_residual=x_residual,
            x_hidden=x_hidden,
            scale_exp_in=exp_in,
            scale_exp_out=exp_out,
            activation=layer.activation,
            norm_kind=None if norm is None else norm.kind,
            norm_eps=0.0 if norm is None else norm.eps,
            present=present,
            index=layer.index,
            family=layer.family,
        )

    def to_ffn(self) -> FFNLayer:
        """Undo the normalisation: the FFNLayer this graph was built from, bit for bit."""
        s_in, s_out = 2.0**self.scale_exp_in, 2.0**self.scale_exp_out
        norm = None
        if self.norm_kind is not None:
            bias = self.x_residual[:, 1].clone() if "norm.bias" in self.present else None
            norm = Norm(self.norm_kind, self.x_residual[:, 0].clone(), bias, self.norm_eps)
        return FFNLayer(
            w_in=self.edge_in * s_in,
            w_gate=None if self.edge_gate is None else self.edge_gate * s_in,
            w_out=self.edge_out * s_out,
            b_in=self.x_hidden[:, 0] * s_in if "b_in" in self.present else None,
            b_out=self.x_residual[:, 2] * s_out if "b_out" in self.present else None,
            norm=norm,
            activation=self.activation,
            index=self.index,
            family=self.family,
        )

    # -- structure ----------------------------------------------------------------------
    @property
    def n_residual(self) -> int:
        return self.edge_in.shape[1]

    @property
    def n_hidden(self) -> int:
        return self.edge_in.shape[0]

    @property
    def n_edges(self) -> int:
        """Directed edges: one residual→hidden and one hidden→residual per pair."""
        return 2 * self.n_residual * self.n_hidden

    @property
    def edge_in_channels(self) -> torch.Tensor:  # [c_in, f, d], c_in = 1 or 2
        blocks = [self.edge_in] if self.edge_gate is None else [self.edge_in, self.edge_gate]
        return torch.stack(blocks)

    def permute_hidden(self, perm: torch.Tensor) -> ParamGraph:
        """The graph with hidden node perm[j] moved to position j.   perm: [f]"""
        return dataclasses.replace(
            self,
            edge_in=self.edge_in[perm],
            edge_gate=None if self.edge_gate is None else self.edge_gate[perm],
            edge_out=self.edge_out[:, perm],
            x_hidden=self.x_hidden[perm],
        )

    def counts(self) -> dict[str, int]:
        return {
            "residual_nodes": self.n_residual,
            "hidden_nodes": self.n_hidden,
            "edges_reads": self.n_residual * self.n_hidden,
            "edges_writes": self.n_residual * self.n_hidden,
            "edges": self.n_edges,
        }

    # -- export -------------------------------------------------------------------------
    def to_pyg(self, max_edges: int = MAX_PYG_EDGES):
        """torch_geometric HeteroData with node types `residual`, `hidden` and edge types
        (residual, reads, hidden) [edge_attr: c_in channels] and (hidden, writes, residual)."""
        from torch_geometric.data import HeteroData

        _refuse_if_larger(self.n_edges, max_edges, "to_pyg")
        f, d = self.n_hidden, self.n_residual
        hidden_idx = torch.arange(f).repeat_interleave(d)  # pair p = j·d + i
        residual_idx = torch.arange(d).repeat(f)
        data = HeteroData()
        data["residual"].x = self.x_residual
        data["hidden"].x = self.x_hidden
        data["residual", "reads", "hidden"].edge_index = torch.stack([residual_idx, hidden_idx])
        data["residual", "reads", "hidden"].edge_attr = self.edge_in_channels.reshape(-1, f * d).T  # [f·d, c_in]
        data["hidden", "writes", "residual"].edge_index = torch.stack([hidden_idx, residual_idx])
        data["hidden", "writes", "residual"].edge_attr = self.edge_out.T.reshape(f * d, 1)
        return data

    def to_networkx(self, max_edges: int = MAX_NETWORKX_EDGES):
        """networkx DiGraph: nodes `r{i}` / `h{j}` with their features, edges with `weight` (and `gate`)."""
        import networkx as nx

        _refuse_if_larger(self.n_edges, max_edges, "to_networkx")
        graph = nx.DiGraph(activation=self.activation, family=self.family, layer=self.index)
        for i, row in enumerate(self.x_residual.tolist()):
            graph.add_node(f"r{i}", kind="residual", **dict(zip(RESIDUAL_FEATURES, row)))
        for j, row in enumerate(self.x_hidden.tolist()):
            graph.add_node(f"h{j}", kind="hidden", **dict(zip(HIDDEN_FEATURES, row)))
        edge_in, edge_out = self.edge_in.tolist(), self.edge_out.T.tolist()
        edge_gate = None if self.edge_gate is None else self.edge_gate.tolist()
        for j in range(self.n_hidden):
            for i in range(self.n_residual):
                reads = {"weight": edge_in[j][i]} | ({} if edge_gate is None else {"gate": edge_gate[j][i]})
                graph.add_edge(f"r{i}", f"h{j}", kind="reads", **reads)
                graph.add_edge(f"h{j}", f"r{i}", kind="writes", weight=edge_out[j][i])
        return graph

    # -- files --------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the graph as a torch file of tensors and plain values (loads with weights_only=True)."""
        state = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    @classmethod
    def load(cls, path: str | Path) -> ParamGraph:
        state = torch.load(path, weights_only=True)
        state["present"] = tuple(state["present"])
        return cls(**state)


def _power_of_two_exponent(tensors: list[torch.Tensor]) -> int:
    """round(log2(RMS)) over all entries; 0 for all-zero tensors."""
    total = sum(t.double().pow(2).sum().item() for t in tensors)
    count = sum(t.numel() for t in tensors)
    rms = math.sqrt(total / max(count, 1))
    return round(math.log2(rms)) if rms > 0 else 0


def _refuse_if_larger(n_edges: int, max_edges: int, what: str) -> None:
    if n_edges > max_edges:
        raise GraphError(
            f"{what}: the graph has {n_edges:,} edges, over the limit of {max_edges:,}; "
            "use the dense ParamGraph (or raise max_edges if you have the memory)"
        )
