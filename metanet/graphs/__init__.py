"""Parameter graphs of FFN layers and whole models (see DESIGN.md, "Data flow")."""

from metanet.graphs.model_graph import ModelGraph
from metanet.graphs.param_graph import MAX_NETWORKX_EDGES, MAX_PYG_EDGES, ParamGraph

__all__ = ["MAX_NETWORKX_EDGES", "MAX_PYG_EDGES", "ModelGraph", "ParamGraph"]
