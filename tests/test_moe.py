"""MoEFFN and model conversion: against the dense transformers models and the reference arithmetic."""

import copy

import pytest
import torch

from conftest import MODEL_TYPES
from metanet.checkpoints import open_checkpoint
from metanet.errors import MetanetError
from metanet.moe import MoEFFN, convert, dense_ffn_layers, expert_output_norms, moe_forward, select_experts
from metanet.partition import LayerPartition, OperatingPoint, Partition
from tests_support import WIDTH, make_point, random_partition, relative


def model_output(model, family: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state if family == "bert" else out.logits


def moe_modules(model) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


# -- extraction ---------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_dense_ffn_layers_equal_what_the_checkpoint_reader_reads(tiny_models, model_type):
    tiny = tiny_models[model_type]
    from_model = dense_ffn_layers(tiny.model, tiny.family)
    from_disk = list(open_checkpoint(tiny.path).layers())
    assert len(from_model) == len(from_disk) == tiny.model.config.num_hidden_layers
    for a, b in zip(from_model, from_disk):
        assert a.tensors().keys() == b.tensors().keys()
        for name in a.tensors():
            assert torch.equal(a.tensors()[name], b.tensors()[name]), name
        assert (a.activation, a.index, a.family, a.norm.kind, a.norm.eps) == (b.activation, b.index, b.family, b.norm.kind, b.norm.eps)
        assert a.fingerprint() == b.fingerprint()  # a partition made from the files is accepted for the in-memory model


# -- conversion of whole models ------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_converted_model_with_every_expert_active_equals_the_dense_model(tiny_models, model_type):
    tiny = tiny_models[model_type]
    layers = dense_ffn_layers(tiny.model, tiny.family)
    partition = random_partition(layers, make_point(tiny.d_ff))
    ids = token_ids()
    dense = model_output(tiny.model, tiny.family, ids)

    moe_model = convert(copy.deepcopy(tiny.model), tiny.family, partition)

    assert len(moe_modules(moe_model)) == len(layers)
    assert not moe_modules(tiny.model)  # the fixture's model is untouched
    torch.testing.assert_close(model_output(moe_model, tiny.family, ids), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_converted_model_with_k_below_E_runs_moe_forward_in_every_block(tiny_models, model_type):
    tiny = tiny_models[model_type]
    layers = dense_ffn_layers(tiny.model, tiny.family)
    point = make_point(tiny.d_ff, active=3, shared=1)
    partition = random_partition(layers, point, seed=1)
    moe_model = convert(copy.deepcopy(tiny.model), tiny.family, partition)
    seen = {}
    for moe in moe_modules(moe_model):
        moe.register_forward_hook(lambda module, args, out: seen.__setitem__(module.index, (args[0], out)))

    ids = token_ids()
    out = model_output(moe_model, tiny.family, ids)

    assert sorted(seen) == list(range(len(layers)))
    for layer, lp in zip(layers, partition.layers):
        x, y = seen[layer.index]
        x2 = x.reshape(-1, tiny.d_model)
        mask = select_experts(lp.scores(x2), point)
        assert mask.sum(1).eq(3).all() and mask[:, 0].all()
        torch.testing.assert_close(y.reshape(-1, tiny.d_model), moe_forward(layer, lp.assign, mask, x2), rtol=1e-5, atol=1e-5)
    assert relative(out, model_output(tiny.model, tiny.family, ids)) > 1e-3


def test_partition_from_checkpoint_files_converts_a_model_loaded_from_them(tiny_models, tmp_path):
    tiny = tiny_models["gpt2"]
    ckpt = open_checkpoint(tiny.path)
    random_partition(list(ckpt.layers()), make_point(ckpt.d_ff), seed=2).save(tmp_path / "partition")
    partition = Partition.load(tmp_path / "partition")
    model = type(tiny.model).from_pretrained(tiny.path).eval()
    ids = token_ids(3)

    convert(model, ckpt.family.name, partition)

    torch.testing.assert_close(model_output(model, "gpt2", ids), model_output(tiny.model, "gpt2", ids), rtol=1e-5, atol=1e-5)


def test_convert_refuses_a_partition_made_for_other_weights(tiny_models):
    tiny = tiny_models["llama"]
    partition = random_partition(dense_ffn_layers(tiny.model, "llama"), make_point(tiny.d_ff))
    torch.manual_seed(7)
    other = type(tiny.model)(tiny.model.config).eval()  # same architecture, other weights

    with pytest.raises(MetanetError, match="made for another checkpoint.*layer 0"):
        convert(other, "llama", partition)
    assert not moe_modules(other)  # nothing was swapped before the refusal

    one_layer_changed = copy.deepcopy(tiny.model)
    with torch.no_grad():
        one_layer_changed.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    with pytest.raises(MetanetError, match="layer 1's weights differ"):
        convert(one_layer_changed, "llama", partition)


def test_convert_refuses_unknown_family_wrong_model_and_wrong_layer_count(tiny_models):
    tiny = tiny_models["opt"]
    layers = dense_ffn_layers(tiny.model, "opt")
    partition = random_partition(layers, make_point(tiny.d_ff))
    model = copy.deepcopy(tiny.model)
    with pytest.raises(MetanetError, match="unknown model family 't5'; supported: gpt2, bert, opt, gpt_neox, llama"):
        convert(model, "t5", partition)
    with pytest.raises(MetanetError, match="not a gpt2 model"):
        convert(model, "gpt2", partition)
    short = Partition("random", "random", partition.point, partition.expert_width, partition.layers[:1], partition.fingerprints[:1])
    with pytest.raises(MetanetError, match="the partition has 1 layers, the model 2"):
        convert(model, "opt", short)
    convert(model, "opt", partition)
    with pytest.raises(MetanetError, match="already runs an MoEFFN"):
        convert(model, "opt", partition)


# -- the module ----------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_moe_ffn_with_k_below_E_equals_moe_forward_and_differs_from_dense(tiny_models, model_type):
    tiny = tiny_models[model_type]
    layer = dense_ffn_layers(tiny.model, tiny.family)[0]
    point = make_point(tiny.d_ff, active=2)
    lp = random_partition([layer], point, seed=3).layers[0]
    moe = MoEFFN.from_layer(layer, lp, point)
    x = torch.randn(4, 6, tiny.d_model, generator=torch.Generator().manual_seed(4))  # [..., d]

    with torch.no_grad():
        y = moe(x)
    x2 = x.reshape(-1, tiny.d_model)
    expected = moe_forward(layer, lp.assign, select_experts(lp.scores(x2), point), x2)

    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, tiny.d_model), expected, rtol=1e-5, atol=1e-5)
    assert relative(y, layer.forward(x)) > 0.05


def test_shared_experts_are_always_selected(tiny_models):
    tiny = tiny_models["gpt_neox"]  # d_ff 72 → E = 9
    layer = dense_ffn_layers(tiny.model, "gpt_neox")[0]
    point = make_point(tiny.d_ff, active=4, shared=2)
    lp = random_partition([layer], point, seed=5).layers[0]
    lp.router_bias[:2] = -1e6  # the router would never pick the shared experts …
    lp.router_bias[5] = 1e6  # … and always picks routed expert 5
    moe = MoEFFN.from_layer(layer, lp, point)
    x = torch.randn(50, tiny.d_model, generator=torch.Generator().manual_seed(6))

    mask = moe.route(x)  # [T, E]

    assert mask[:, :2].all() and mask[:, 5].all()
    assert mask.sum(1).eq(4).all()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), moe_forward(layer, lp.assign, mask, x), rtol=1e-5, atol=1e-5)


def test_forward_with_mask_runs_oracle_routing_and_the_full_mask_is_dense(tiny_models):
    tiny = tiny_models["llama"]
    layer = dense_ffn_layers(tiny.model, "llama")[1]
    point = make_point(tiny.d_ff, active=3)
    lp = random_partition([layer], point, seed=8).layers[0]
    moe = MoEFFN.from_layer(layer, lp, point)
    x = torch.randn(2, 20, tiny.d_model, generator=torch.Generator().manual_seed(9))
    x2 = x.reshape(-1, tiny.d_model)
    oracle = select_experts(expert_output_norms(layer, lp.assign, x2, point.experts), point)  # [T, E]

    with torch.no_grad():
        y_oracle = moe.forward_with_mask(x, oracle.reshape(2, 20, -1))
        y_all = moe.forward_with_mask(x, torch.ones(2, 20, point.experts, dtype=torch.bool))
        y_router = moe(x)

    torch.testing.assert_close(y_oracle.reshape(-1, tiny.d_model), moe_forward(layer, lp.assign, oracle, x2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_all, layer.forward(x), rtol=1e-5, atol=1e-5)
    assert relative(y_oracle, y_all) < relative(y_router, y_all)  # the oracle picks the largest contributions
    with pytest.raises(MetanetError, match="routing mask has shape"):
        moe.forward_with_mask(x, oracle)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])  # biased, and gated
def test_experts_are_stored_grouped_and_contiguous(tiny_models, model_type):
    tiny = tiny_models[model_type]
    layer = dense_ffn_layers(tiny.model, tiny.family)[0]
    point = make_point(tiny.d_ff, active=2)
    lp = random_partition([layer], point, seed=10).layers[0]
    moe = MoEFFN.from_layer(layer, lp, point)
    E, m, d = point.experts, WIDTH, tiny.d_model

    assert moe.w_in.shape == (E, m, d) and moe.w_out.shape == (E, d, m)
    assert moe.router_weight.shape == (E, d) and moe.router_bias.shape == (E,)
    assert all(p.is_contiguous() for p in moe.parameters())
    for e in range(E):
        neurons = lp.assign == e  # boolean indexing keeps increasing j
        assert torch.equal(moe.w_in[e], layer.w_in[neurons])
        assert torch.equal(moe.w_out[e], layer.w_out[:, neurons])
        if layer.gated:
            assert torch.equal(moe.w_gate[e], layer.w_gate[neurons])
        else:
            assert torch.equal(moe.b_in[e], layer.b_in[neurons])
    assert (moe.w_gate is not None) == layer.gated and (moe.b_in is not None) == (layer.b_in is not None)
    assert torch.equal(moe.assign(), lp.assign)
    assert set(moe.state_dict()) >= {"w_in", "w_out", "router_weight", "router_bias", "order"}


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_to_ffn_layer_round_trips_to_the_dense_layer(tiny_models, model_type):
    tiny = tiny_models[model_type]
    layer = dense_ffn_layers(tiny.model, tiny.family)[1]
    point = make_point(tiny.d_ff, active=2)
    moe = MoEFFN.from_layer(layer, random_partition([layer], point, seed=11).layers[0], point)

    grouped = moe.to_ffn_layer()
    restored = grouped.permute_hidden(torch.argsort(moe.order))

    for original in (restored, moe.to_ffn_layer(original_order=True)):
        assert original.tensors().keys() == {k for k in layer.tensors() if not k.startswith("norm.")}
        for name, tensor in original.tensors().items():
            assert torch.equal(tensor, layer.tensors()[name]), name
        assert original.fingerprint() == layer.fingerprint()
    assert (grouped.index, grouped.activation, grouped.family) == (layer.index, layer.activation, layer.family)
    assert not torch.equal(grouped.w_in, layer.w_in)  # grouping really reordered the neurons …
    x = torch.randn(7, tiny.d_model)
    torch.testing.assert_close(grouped.forward(x), layer.forward(x), rtol=1e-5, atol=1e-5)  # … and kept the function


def test_bfloat16_module_keeps_dtype_and_stays_close(tiny_models):
    tiny = tiny_models["qwen2"]
    layer = dense_ffn_layers(tiny.model, "llama")[0]
    point = make_point(tiny.d_ff)
    moe = MoEFFN.from_layer(layer.to(torch.bfloat16), random_partition([layer], point).layers[0], point)
    x = torch.randn(10, tiny.d_model)

    with torch.no_grad():
        y = moe(x.bfloat16())

    assert y.dtype == torch.bfloat16 and moe.router_weight.dtype == torch.bfloat16
    assert relative(y.float(), layer.forward(x)) < 2e-2


def test_from_layer_refuses_bad_partitions(tiny_models):
    tiny = tiny_models["opt"]  # d_ff 96
    layer = dense_ffn_layers(tiny.model, "opt")[0]
    point = make_point(tiny.d_ff, active=2)  # E = 12, m = 8
    lp = random_partition([layer], point).layers[0]
    unbalanced = lp.assign.clone()
    unbalanced[unbalanced == 1] = 0
    with pytest.raises(MetanetError, match="experts must all have width 8"):
        MoEFFN.from_layer(layer, LayerPartition(unbalanced, lp.router_weight, lp.router_bias), point)
    with pytest.raises(MetanetError, match="router weight has shape"):
        MoEFFN.from_layer(layer, LayerPartition(lp.assign, lp.router_weight[:, :5], lp.router_bias), point)
    with pytest.raises(MetanetError, match="outside 0..11"):
        MoEFFN.from_layer(layer, LayerPartition(lp.assign + 1, lp.router_weight, lp.router_bias), point)
    with pytest.raises(MetanetError, match="does not split d_ff=96"):
        MoEFFN.from_layer(layer, lp, OperatingPoint(7, 2, width_multiple=1))
