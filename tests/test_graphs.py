"""Parameter graphs: exact round trips, permutation equivariance, exports."""

import networkx as nx
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from conftest import MODEL_TYPES
from metanet.checkpoints import FFNLayer, open_checkpoint
from metanet.errors import GraphError
from metanet.graphs import ModelGraph, ParamGraph


def assert_bitwise_equal(a: FFNLayer, b: FFNLayer):
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert (a.activation, a.index, a.family, a.norm.kind, a.norm.eps) == (b.activation, b.index, b.family, b.norm.kind, b.norm.eps)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_graph_round_trip_restores_every_weight_bit_for_bit(tiny_models, model_type, normalize):
    for layer in open_checkpoint(tiny_models[model_type].path).layers():
        assert_bitwise_equal(ParamGraph.from_ffn(layer, normalize).to_ffn(), layer)


def test_round_trip_on_minilm_in_bfloat16_and_float32(minilm_path):
    ckpt = open_checkpoint(minilm_path)
    for dtype in (torch.float32, torch.bfloat16):
        layer = ckpt.layer(4, dtype)
        graph = ParamGraph.from_ffn(layer)
        assert graph.scale_exp_in != 0  # the normalisation really rescaled
        assert_bitwise_equal(graph.to_ffn(), layer)


def test_normalised_edges_have_unit_order_rms(minilm_path):
    graph = ParamGraph.from_ffn(open_checkpoint(minilm_path).layer(0))
    for block in (graph.edge_in, graph.edge_out):
        rms = block.pow(2).mean().sqrt().item()
        assert 2**-0.5 <= rms <= 2**0.5


def test_saved_graph_loads_back_identical(tiny_models, tmp_path):
    layer = open_checkpoint(tiny_models["llama"].path).layer(1)
    ParamGraph.from_ffn(layer).save(tmp_path / "g.pt")
    assert_bitwise_equal(ParamGraph.load(tmp_path / "g.pt").to_ffn(), layer)


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "llama"])
def test_permuting_hidden_neurons_permutes_the_graph_and_keeps_the_function(tiny_models, model_type):
    layer = open_checkpoint(tiny_models[model_type].path).layer(0, torch.float64)
    perm = torch.randperm(layer.d_ff, generator=torch.Generator().manual_seed(3))
    permuted = layer.permute_hidden(perm)
    a, b = ParamGraph.from_ffn(permuted), ParamGraph.from_ffn(layer).permute_hidden(perm)
    for name in ("edge_in", "edge_out", "x_hidden", "x_residual"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.edge_gate is None) == (not layer.gated) and (a.edge_gate is None or torch.equal(a.edge_gate, b.edge_gate))
    assert not torch.equal(permuted.w_in, layer.w_in)  # the permutation moved something
    x = torch.randn(64, layer.d_model, dtype=torch.float64)
    torch.testing.assert_close(permuted.forward(x), layer.forward(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.to_ffn().forward(x), layer.forward(x), rtol=1e-6, atol=1e-6)


def test_pyg_export_places_each_weight_on_its_edge(tiny_models):
    layer = open_checkpoint(tiny_models["llama"].path).layer(1)
    graph = ParamGraph.from_ffn(layer)
    data = graph.to_pyg()
    reads, writes = data["residual", "reads", "hidden"], data["hidden", "writes", "residual"]
    assert reads.edge_index.shape == (2, layer.d_ff * layer.d_model) and reads.edge_attr.shape[1] == 2
    s_in, s_out = 2.0**graph.scale_exp_in, 2.0**graph.scale_exp_out
    for e in (0, 17, reads.edge_index.shape[1] - 1):
        i, j = reads.edge_index[:, e].tolist()
        assert reads.edge_attr[e].tolist() == [layer.w_in[j, i].item() / s_in, layer.w_gate[j, i].item() / s_in]
        j2, i2 = writes.edge_index[:, e].tolist()
        assert writes.edge_attr[e, 0].item() == layer.w_out[i2, j2].item() / s_out
    assert data["hidden"].x.shape == (layer.d_ff, 1) and data["residual"].x.shape == (layer.d_model, 3)


def test_networkx_export_and_size_limit(tiny_models):
    layer = open_checkpoint(tiny_models["opt"].path).layer(0)
    graph = ParamGraph.from_ffn(layer)
    g = graph.to_networkx()
    assert g.number_of_nodes() == layer.d_model + layer.d_ff
    assert g.number_of_edges() == graph.n_edges
    assert g.edges["r3", "h5"]["weight"] * 2.0**graph.scale_exp_in == layer.w_in[5, 3].item()
    assert g.edges["h5", "r3"]["weight"] * 2.0**graph.scale_exp_out == layer.w_out[3, 5].item()
    with pytest.raises(GraphError, match="over the limit"):
        graph.to_networkx(max_edges=graph.n_edges - 1)
    with pytest.raises(GraphError, match="over the limit"):
        graph.to_pyg(max_edges=10)


def test_whole_model_graph_links_residual_nodes_of_consecutive_layers(tiny_models):
    ckpt = open_checkpoint(tiny_models["gpt_neox"].path)
    model_graph = ModelGraph.from_checkpoint(ckpt)
    data = model_graph.to_pyg()
    d, f, n = ckpt.d_model, ckpt.d_ff, ckpt.n_layers
    assert data["residual"].x.shape[0] == n * d and data["hidden"].x.shape[0] == n * f
    stream = data["residual", "next", "residual"].edge_index
    assert stream.shape == (2, (n - 1) * d)
    assert torch.equal(stream[1] - stream[0], torch.full(((n - 1) * d,), d))
    reads = data["residual", "reads", "hidden"]
    last = reads.edge_index[:, -1]  # last edge: residual d-1 of the last layer → its last hidden neuron
    assert last.tolist() == [n * d - 1, n * f - 1]
    assert data["hidden"].layer[last[1]] == n - 1 and data["residual"].layer[last[0]] == n - 1
    assert reads.edge_attr[-1, 0] == model_graph.layers[-1].edge_in[-1, -1]


def test_graph_cli_writes_the_graph_and_graphml(tiny_models, tmp_path):
    path = tiny_models["bert"].path
    result = CliRunner().invoke(app, ["graph", str(path), "--layer", "1", "--out", str(tmp_path / "g.pt"), "--graphml", str(tmp_path / "g.graphml")])
    assert result.exit_code == 0, result.output
    assert "hidden nodes" in result.stdout and "80" in result.stdout
    assert_bitwise_equal(ParamGraph.load(tmp_path / "g.pt").to_ffn(), open_checkpoint(path).layer(1))
    g = nx.read_graphml(tmp_path / "g.graphml")
    assert g.number_of_nodes() == 32 + 80 and g.number_of_edges() == 2 * 32 * 80
