"""The metanetwork's symmetries, tested rather than assumed (DESIGN.md "Symmetries")."""

import dataclasses

import pytest
import torch

from metanet.checkpoints import open_checkpoint
from metanet.model import MetaNetConfig, MetaNetwork
from metanet.partition import OperatingPoint


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return MetaNetwork(MetaNetConfig(width=32, depth=3)).eval()


def permute_residual(layer, perm):
    """The same FFN in a permuted residual basis: x ↦ x[perm] on inputs and outputs."""
    norm = dataclasses.replace(layer.norm, weight=layer.norm.weight[perm], bias=None if layer.norm.bias is None else layer.norm.bias[perm])
    return dataclasses.replace(
        layer, w_in=layer.w_in[:, perm], w_gate=None if layer.w_gate is None else layer.w_gate[:, perm],
        w_out=layer.w_out[perm], b_out=None if layer.b_out is None else layer.b_out[perm], norm=norm,
    )


def co_membership(assign):
    return assign[:, None] == assign[None, :]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_permuting_hidden_neurons_permutes_embeddings_assignment_and_router(net, tiny_models, model_type):
    layer = open_checkpoint(tiny_models[model_type].path).layer(0)
    perm = torch.randperm(layer.d_ff, generator=torch.Generator().manual_seed(1))
    point = OperatingPoint(8, 3, 1, width_multiple=1)
    with torch.no_grad():
        h, r = net.embed(layer)
        h_p, r_p = net.embed(layer.permute_hidden(perm))
    torch.testing.assert_close(h_p, h[perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r_p, r, rtol=1e-5, atol=1e-5)
    a, b = net.predict(layer, point), net.predict(layer.permute_hidden(perm), point)
    assert torch.equal(co_membership(b.assign), co_membership(a.assign)[perm][:, perm])
    torch.testing.assert_close(b.router_weight[b.assign], a.router_weight[a.assign][perm], rtol=1e-5, atol=1e-6)
    assert len(set(a.assign.tolist())) == 8  # a real partition, not everything in one expert


def test_permuting_the_residual_basis_leaves_neurons_alone_and_permutes_router_columns(net, tiny_models):
    layer = open_checkpoint(tiny_models["opt"].path).layer(1)
    perm = torch.randperm(layer.d_model, generator=torch.Generator().manual_seed(2))
    point = OperatingPoint(6, 2, width_multiple=1)
    with torch.no_grad():
        h, r = net.embed(layer)
        h_p, r_p = net.embed(permute_residual(layer, perm))
    torch.testing.assert_close(h_p, h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r_p, r[perm], rtol=1e-5, atol=1e-5)
    a, b = net.predict(layer, point), net.predict(permute_residual(layer, perm), point)
    assert torch.equal(a.assign, b.assign)
    torch.testing.assert_close(b.router_weight, a.router_weight[:, perm])


def test_relu_neuron_rescaling_changes_nothing(net, tiny_models):
    layer = open_checkpoint(tiny_models["opt"].path).layer(0)  # ReLU
    c = torch.exp(torch.randn(layer.d_ff, generator=torch.Generator().manual_seed(3)))  # positive, spread over e^±3
    rescaled = dataclasses.replace(layer, w_in=layer.w_in * c[:, None], b_in=layer.b_in * c, w_out=layer.w_out / c)
    x = torch.randn(16, layer.d_model)
    torch.testing.assert_close(rescaled.forward(x), layer.forward(x), rtol=1e-4, atol=1e-5)  # the symmetry is real
    with torch.no_grad():
        torch.testing.assert_close(net.embed(rescaled)[0], net.embed(layer)[0], rtol=1e-4, atol=1e-4)
    point = OperatingPoint(6, 2, width_multiple=1)
    assert torch.equal(net.predict(rescaled, point).assign, net.predict(layer, point).assign)


def test_one_network_runs_on_any_width_and_is_deterministic(net, tiny_models, minilm_path):
    for path, point in ((minilm_path, OperatingPoint(16, 4)), (tiny_models["qwen2"].path, OperatingPoint(4, 2, width_multiple=4))):
        layer = open_checkpoint(path).layer(0)
        a, b = net.predict(layer, point), net.predict(layer, point)
        m = layer.d_ff // point.experts
        assert torch.equal(torch.bincount(a.assign), torch.full((point.experts,), m))
        assert torch.equal(a.assign, b.assign) and torch.equal(a.router_weight, b.router_weight)
        assert a.router_weight.shape == (point.experts, layer.d_model)


def test_statistics_change_the_prediction(net, tiny_models):
    from metanet.calib import neuron_stats

    layer = open_checkpoint(tiny_models["opt"].path).layer(0)
    stats = neuron_stats(layer, torch.randn(256, layer.d_model))
    with torch.no_grad():
        assert not torch.allclose(net.embed(layer, stats)[0], net.embed(layer)[0])


def test_norm_is_optional(net, tiny_models):
    layer = dataclasses.replace(open_checkpoint(tiny_models["llama"].path).layer(0), norm=None)
    assert net.predict(layer, OperatingPoint(11, 3, width_multiple=1)).assign.shape == (layer.d_ff,)




def test_predict_and_a_training_step_create_every_tensor_where_the_layer_is(net, tiny_models):
    """With the default device set to "meta", a tensor made without the layer's device lands on meta and the first
    operation that mixes it with the layer's CPU tensors fails; so this run passing means a layer on a GPU is
    predicted, trained and validated on that GPU alone. The results equal those of a plain run."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from metanet.calib import neuron_stats
    from training.metanet_data import LayerSample
    from training.metanet_module import MetaNetModule

    layer = open_checkpoint(tiny_models["llama"].path).layer(0)
    x = torch.randn(64, layer.d_model, generator=torch.Generator().manual_seed(0))
    sample = LayerSample("llama", 0, layer, x, x, neuron_stats(layer, x), {})
    sample = move_data_to_device(sample, torch.device("cpu"))  # what Lightning does to each training sample
    point = OperatingPoint(4, 2, shared=1, width_multiple=2)  # d_ff = 88
    module = MetaNetModule(network={"width": 32, "depth": 3})

    def run():
        torch.manual_seed(0)
        with torch.no_grad():
            prediction, validation = net.predict(layer, point, sample.stats), module.layer_rel_errors(sample, point)
        return prediction, module.losses(sample, point, with_stats=True), validation

    expected_prediction, expected_losses, expected_validation = run()
    with torch.device("meta"):
        prediction, losses, validation = run()

    assert torch.equal(prediction.assign, expected_prediction.assign)
    torch.testing.assert_close(prediction.router_weight, expected_prediction.router_weight)
    assert losses.keys() == expected_losses.keys() and all(loss.device.type == "cpu" for loss in losses.values())
    torch.testing.assert_close(torch.stack(list(losses.values())), torch.stack(list(expected_losses.values())))
    assert validation == pytest.approx(expected_validation)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_predict_on_a_gpu_gives_the_cpu_partition(tiny_models, model_type):
    from metanet.partition.make import make_partition

    checkpoint = open_checkpoint(tiny_models[model_type].path)
    point = OperatingPoint(4, 2, width_multiple=1)
    on_cpu, on_gpu = (make_partition(checkpoint, "metanet", point, device=device) for device in ("cpu", "cuda"))

    for cpu_layer, gpu_layer in zip(on_cpu.layers, on_gpu.layers):
        assert gpu_layer.assign.device.type == "cpu" and gpu_layer.router_weight.device.type == "cpu"
        agreement = (co_membership(cpu_layer.assign) == co_membership(gpu_layer.assign)).float().mean()
        assert agreement >= 0.95, agreement  # float sums differ by device: a near-tie neuron may change expert
