"""Training relaxations of the metanetwork: balance, label invariance, gradients."""

import torch

from metanet.checkpoints import open_checkpoint
from metanet.model import MetaNetConfig, MetaNetwork
from metanet.model.soft import co_membership_loss, reconstruction_loss, sinkhorn, soft_partition


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
    out = net.heads(net.embed(layer)[0])
    p = soft_partition(out["z"], 8, 16)
    assert p.max(1).values.mean() > 0.3  # neurons are told apart: not the uniform 1/8 of collapsed embeddings
    relabel = torch.randperm(8)
    loss = reconstruction_loss(layer, x, p, out["alpha"], k=2)
    torch.testing.assert_close(reconstruction_loss(layer, x, p[:, relabel], out["alpha"], k=2), loss)
    assert reconstruction_loss(layer, x, p, out["alpha"], k=8) < 1e-10 < loss  # every expert kept: the dense layer
    loss.backward()
    for head in (net.cluster_head, net.router_head, net.layers[0]):
        assert any(param.grad is not None and param.grad.abs().sum() > 0 for param in head.parameters())
