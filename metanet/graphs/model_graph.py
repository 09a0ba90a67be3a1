"""The parameter graph of a whole model: its layers' graphs joined along the residual stream.

Residual node i of layer l is linked to residual node i of layer l+1 by an edge
(residual, next, residual): the residual stream carries coordinate i from one block
to the next. Hidden nodes stay private to their layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metanet.checkpoints import Checkpoint
from metanet.graphs.param_graph import MAX_PYG_EDGES, ParamGraph, _refuse_if_larger


@dataclass
class ModelGraph:
    layers: list[ParamGraph]

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, normalize: bool = True) -> ModelGraph:
        return cls([ParamGraph.from_ffn(layer, normalize) for layer in checkpoint.layers()])

    @property
    def n_edges(self) -> int:
        stream = self.layers[0].n_residual * (len(self.layers) - 1)
        return sum(g.n_edges for g in self.layers) + stream

    def to_pyg(self, max_edges: int = MAX_PYG_EDGES):
        """HeteroData over all layers: node attribute `layer` gives each node's block;
        edge types (residual, reads, hidden), (hidden, writes, residual), (residual, next, residual)."""
        from torch_geometric.data import HeteroData

        _refuse_if_larger(self.n_edges, max_edges, "ModelGraph.to_pyg")
        parts = [g.to_pyg(max_edges) for g in self.layers]
        d = self.layers[0].n_residual
        hidden_offsets = torch.tensor([0] + [g.n_hidden for g in self.layers]).cumsum(0)
        data = HeteroData()
        data["residual"].x = torch.cat([p["residual"].x for p in parts])
        data["residual"].layer = torch.arange(len(parts)).repeat_interleave(d)
        data["hidden"].x = torch.cat([p["hidden"].x for p in parts])
        data["hidden"].layer = torch.cat([torch.full((g.n_hidden,), l) for l, g in enumerate(self.layers)])
        for (src, rel, dst), src_is_residual in ((("residual", "reads", "hidden"), True), (("hidden", "writes", "residual"), False)):
            index, attr = [], []
            for l, p in enumerate(parts):
                offset = torch.tensor([[l * d], [hidden_offsets[l]]]) if src_is_residual else torch.tensor([[hidden_offsets[l]], [l * d]])
                index.append(p[src, rel, dst].edge_index + offset)
                attr.append(p[src, rel, dst].edge_attr)
            data[src, rel, dst].edge_index = torch.cat(index, dim=1)
            data[src, rel, dst].edge_attr = torch.cat(attr)
        stream = torch.arange((len(parts) - 1) * d)
        data["residual", "next", "residual"].edge_index = torch.stack([stream, stream + d])
        return data
