"""Partitioners, routers and the Partition folder."""

import pytest
import torch

from metanet.calib import neuron_stats
from metanet.checkpoints import open_checkpoint
from metanet.errors import MetanetError
from metanet.partition import LayerPartition, OperatingPoint, Partition
from metanet.partition.balanced import balanced_assign, balanced_kmeans, cluster_sums, optimal_balanced_assign
from metanet.partition.methods import METHODS, LayerCalibration, assign_neurons, output_weighted_norms
from metanet.partition.routers import ROUTERS, fit_router


@pytest.fixture(scope="module")
def relu_layer(tiny_models):
    """OPT (ReLU) layer 0, d=32, f=96, with calibration inputs drawn like real FFN inputs (unit-scale)."""
    layer = open_checkpoint(tiny_models["opt"].path).layer(0)
    x = torch.randn(512, layer.d_model, generator=torch.Generator().manual_seed(0))
    return layer, LayerCalibration(x, neuron_stats(layer, x))


def test_operating_point_errors_name_the_problem():
    with pytest.raises(MetanetError, match="active k=5 is more than experts E=4"):
        OperatingPoint(4, 5).expert_width(64)
    with pytest.raises(MetanetError, match="E=7 does not split d_ff=1536"):
        OperatingPoint(7, 2).expert_width(1536)
    with pytest.raises(MetanetError, match="multiple of 8"):
        OperatingPoint(16, 4).expert_width(16 * 12)
    with pytest.raises(MetanetError, match="need s < k"):
        OperatingPoint(16, 2, shared=2).expert_width(1536)
    assert OperatingPoint(16, 4, 2).expert_width(1536) == 96


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shared", [0, 2])
def test_every_method_gives_equal_experts_deterministically(relu_layer, method, shared):
    layer, calib = relu_layer
    point = OperatingPoint(6, 3, shared)  # f = 96 → width 16
    assign = assign_neurons(method, layer, point, calib, seed=1)
    assert assign.shape == (96,) and torch.equal(torch.bincount(assign, minlength=6), torch.full((6,), 16))
    assert torch.equal(assign, assign_neurons(method, layer, point, calib, seed=1))
    if shared:  # shared experts hold the most frequently active neurons
        rate = calib.stats.activation_rate
        assert rate[assign < shared].min() >= rate[assign >= shared].max()


def test_data_free_shared_experts_use_output_weighted_norms(relu_layer):
    layer, _ = relu_layer
    assign = assign_neurons("kmeans", layer, OperatingPoint(6, 3, 1))
    importance = output_weighted_norms(layer)
    assert importance[assign == 0].min() >= importance[assign > 0].max()


def test_calibrated_methods_and_routers_refuse_to_run_without_text(relu_layer):
    layer, _ = relu_layer
    with pytest.raises(MetanetError, match="needs calibration text"):
        assign_neurons("coact", layer, OperatingPoint(6, 3))
    with pytest.raises(MetanetError, match="needs calibration text"):
        fit_router("lsq", layer, torch.arange(96) % 6, OperatingPoint(6, 3))
    with pytest.raises(MetanetError, match="evaluation mode"):
        fit_router("oracle", layer, torch.arange(96) % 6, OperatingPoint(6, 3))


def test_balanced_assignments_fill_every_cluster_exactly_and_the_optimum_is_no_worse():
    cost = torch.rand(60, 5, generator=torch.Generator().manual_seed(0))
    greedy, optimal = balanced_assign(cost, 12), optimal_balanced_assign(cost, 12)
    for assign in (greedy, optimal):
        assert torch.equal(torch.bincount(assign), torch.full((5,), 12))
    total = lambda a: cost[torch.arange(60), a].sum()  # noqa: E731
    assert total(optimal) <= total(greedy) + 1e-9


def _greedy_walk(cost: torch.Tensor, capacity: int) -> torch.Tensor:
    """The definition of the greedy assignment: every (item, cluster) pair in increasing (cost, flat index) order."""
    n, k = cost.shape
    assign, room = [-1] * n, [capacity] * k
    for flat in sorted(range(n * k), key=lambda i: (float(cost.flatten()[i]), i)):
        item, cluster = divmod(flat, k)
        if assign[item] < 0 and room[cluster] > 0:
            assign[item], room[cluster] = cluster, room[cluster] - 1
    return torch.tensor(assign)


@pytest.mark.parametrize("k, capacity, rounded", [(4, 3, False), (7, 5, True), (16, 6, False), (5, 9, True)])
def test_vectorised_greedy_assignment_equals_the_pair_by_pair_walk(k, capacity, rounded):
    cost = torch.randn(k * capacity, k, generator=torch.Generator().manual_seed(k))
    cost = cost.round() if rounded else cost  # many exact ties
    assert torch.equal(balanced_assign(cost, capacity), _greedy_walk(cost, capacity))


def test_balanced_kmeans_recovers_planted_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    truth = torch.arange(4).repeat_interleave(10)
    points = centers[truth] + 0.05 * torch.randn(40, 16, generator=generator)
    found = balanced_kmeans(points, 4, 10, seed=3)
    # same clustering up to relabelling: every found cluster is one true cluster
    assert all(len(set(truth[found == c].tolist())) == 1 for c in range(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_balanced_kmeans_on_a_gpu_sums_clusters_like_the_cpu_and_repeats_itself_exactly():
    generator = torch.Generator().manual_seed(0)
    x, assign = torch.randn(4096, 300, generator=generator), torch.randperm(4096, generator=generator) % 16
    torch.testing.assert_close(cluster_sums(x.cuda(), assign.cuda(), 16).cpu(), cluster_sums(x, assign, 16), rtol=1e-4, atol=1e-4)
    runs = [balanced_kmeans(x.cuda(), 16, 256, init="farthest", dtype=torch.float32) for _ in range(3)]
    assert all(torch.equal(run, runs[0]) for run in runs)  # no atomics in the centroid sums: the same partition every run


def test_centroid_and_scaled_routers_are_the_member_means(relu_layer):
    layer, _ = relu_layer
    assign = torch.arange(96) % 6
    point = OperatingPoint(6, 3)
    w, b = fit_router("centroid", layer, assign, point)
    torch.testing.assert_close(w[2], layer.w_in[assign == 2].mean(0))
    torch.testing.assert_close(b[2], layer.b_in[assign == 2].mean())
    w, _ = fit_router("scaled", layer, assign, point)
    c = layer.w_out[:, assign == 4].norm(dim=0)
    torch.testing.assert_close(w[4], (c[:, None] * layer.w_in[assign == 4]).sum(0) / c.sum())


def test_learned_routers_track_the_oracle_better_than_centroid(relu_layer):
    from metanet.moe.routing import expert_output_norms, select_experts

    layer, calib = relu_layer
    point = OperatingPoint(6, 2)
    assign = assign_neurons("kmeans", layer, point)
    oracle = select_experts(expert_output_norms(layer, assign, calib.x, 6), point)
    recall = {}
    for router in ROUTERS:
        w, b = fit_router(router, layer, assign, point, calib)
        recall[router] = (select_experts(calib.x @ w.T + b, point) & oracle).sum().item() / oracle.sum().item()
    assert recall["lsq"] > recall["centroid"] and recall["mlp"] > recall["centroid"]


def small_partition(layers, point, seed=0):
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for layer in layers:
        assign = torch.randperm(layer.d_ff, generator=generator) % point.experts
        parts.append(LayerPartition(assign, torch.randn(point.experts, layer.d_model, generator=generator), torch.randn(point.experts, generator=generator)))
    return Partition("random", "centroid", point, layers[0].d_ff // point.experts, parts, [l.fingerprint() for l in layers], "tiny", {"seed": seed})


def test_partition_folder_round_trip_and_atomic_replace(tiny_models, tmp_path, monkeypatch):
    layers = list(open_checkpoint(tiny_models["llama"].path).layers())
    original = small_partition(layers, OperatingPoint(11, 3, 1))
    original.save(tmp_path / "p")
    loaded = Partition.load(tmp_path / "p")
    assert (loaded.method, loaded.router, loaded.point, loaded.expert_width, loaded.fingerprints, loaded.info) == (
        original.method, original.router, original.point, original.expert_width, original.fingerprints, original.info)
    for a, b in zip(loaded.layers, original.layers):
        assert torch.equal(a.assign, b.assign) and torch.equal(a.router_weight, b.router_weight) and torch.equal(a.router_bias, b.router_bias)
    assert loaded.summary()[0]["expert_sizes"] == [8] * 11

    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(MetanetError, match="cannot write partition"):
        small_partition(layers, OperatingPoint(11, 3, 1), seed=9).save(tmp_path / "p")
    assert torch.equal(Partition.load(tmp_path / "p").layers[0].assign, original.layers[0].assign)  # old one intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_partition_load_errors(tmp_path):
    with pytest.raises(MetanetError, match="not a partition folder"):
        Partition.load(tmp_path)
    (tmp_path / "partition.json").write_text("{}")
    (tmp_path / "partition.safetensors").write_bytes(b"")
    with pytest.raises(MetanetError, match="broken partition"):
        Partition.load(tmp_path)
