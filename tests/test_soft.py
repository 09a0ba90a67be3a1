"""Training relaxations of the metanetwork: balance, label invariance, gradients."""

import torch

from metanet.checkpoints import open_checkpoint
from metanet.model import MetaNetConfig, MetaNetwork
from metanet.model.soft import co_membership_loss, reconstruction_loss, sinkhorn, soft_moe, soft_partition
from metanet.partition import OperatingPoint


def test_sinkhorn_gives_balanced_rows_and_columns():
    p = sinkhorn(torch.randn(48, 6, generator=torch.Generator().manual_seed(0)) * 3, capacity=8, iters=200)
    torch.testing.assert_close(p.sum(1), torch.ones(48), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p.sum(0), torch.full((6,), 8.0), rtol=1e-4, atol=1e-4)


def test_losses_ignore_expert_labels_and_vanish_at_the_teacher():
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randperm(48, generator=generator) % 6
    p = torch.softmax(torch.randn(48, 6, generator=generator), dim=1)
    relabel = torch.randperm(6, generator=generator)
    assert torch.allclose(co_membership_loss(p[:, relabel], teacher), co_membership_loss(p, teacher))
    assert torch.allclose(co_membership_loss(p, relabel[teacher]), co_membership_loss(p, teacher))
    exact = torch.nn.functional.one_hot(relabel[teacher]).float()
    assert co_membership_loss(exact, teacher).abs() < 1e-6 < co_membership_loss(p, teacher)


def test_reconstruction_loss_is_label_invariant_zero_with_every_expert_and_reaches_every_head(tiny_models):
    layer = open_checkpoint(tiny_models["gpt2"].path).layer(0)  # f = 128
    x = torch.randn(64, layer.d_model, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    net = MetaNetwork(MetaNetConfig(width=16, depth=2))
    with torch.no_grad():  # make the zero-initialised heads' corrections non-zero, so gradients reach every layer
        net.input_head[-1].weight.normal_(0, 0.1)
    out = net.neuron_outputs(layer)
    p = soft_partition(out.space, 8, 16)
    assert p.max(1).values.mean() > 0.3  # neurons are told apart: not the uniform 1/8 of collapsed embeddings
    relabel = torch.randperm(8)
    point, every = OperatingPoint(8, 2, width_multiple=1), OperatingPoint(8, 8, width_multiple=1)
    loss = reconstruction_loss(layer, x, p, out, point)
    torch.testing.assert_close(reconstruction_loss(layer, x, p[:, relabel], out, point), loss, rtol=1e-4, atol=1e-6)
    assert reconstruction_loss(layer, x, p, out, every) < 1e-10 < loss  # every expert kept: the dense layer
    loss.backward()
    for head in (net.cluster_head, net.input_head, net.layers[0]):
        assert any(param.grad is not None and param.grad.abs().sum() > 0 for param in head.parameters())
    assert net.mix.grad.abs().sum() > 0


def test_straight_through_values_are_the_hard_partition_and_top_k(tiny_models):
    from metanet.eval.metrics import layer_metrics
    from metanet.model.network import SYNTHETIC_TOKENS, expert_router
    from metanet.partition import LayerPartition

    layer = open_checkpoint(tiny_models["gpt2"].path).layer(0)
    x = torch.randn(256, layer.d_model, generator=torch.Generator().manual_seed(3))
    net = MetaNetwork(MetaNetConfig(width=16, depth=2)).eval()
    point = OperatingPoint(8, 2, width_multiple=1)
    with torch.no_grad():
        out = net.neuron_outputs(layer)
        p = soft_partition(out.space, 8, 16, straight_through=True)
        assign = p.argmax(1)
        assert torch.equal(assign, net.assign(out, point, 16))
        torch.testing.assert_close(p, torch.nn.functional.one_hot(assign, 8).float(), rtol=0, atol=1e-6)  # hard values
        y, y_moe, gates = soft_moe(layer, x, p, out, point, synthetic_tokens=SYNTHETIC_TOKENS, straight_through=True)
        hard = layer_metrics(layer, LayerPartition(assign, *expert_router(layer, assign, out, 8)), point, x)
    torch.testing.assert_close(gates, gates.round(), rtol=0, atol=1e-6)
    torch.testing.assert_close(((y - y_moe).pow(2).sum() / y.pow(2).sum()).sqrt().item(), hard["rel_error"], rtol=1e-4, atol=1e-6)
