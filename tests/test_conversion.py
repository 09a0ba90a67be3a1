"""The conversion pipeline's parts on real tiny models: the block walk, compensation, coverage refinement,
the sequential pipeline itself, per-block sensitivity and plans."""

import copy
import itertools
import math

import pytest
import torch

from metanet.calib import capture_ffn_inputs, load_model_and_tokenizer, neuron_stats
from metanet.checkpoints import open_checkpoint
from metanet.conversion.blocks import BlockWalk
from metanet.conversion.compensate import refit_down_projection
from metanet.conversion.pipeline import ConversionSettings, convert_checkpoint
from metanet.conversion.plan import Plan, frontier, make_plan, pareto_curve
from metanet.conversion.sensitivity import Sensitivity, measure_sensitivity
from metanet.errors import MetanetError
from metanet.eval.metrics import layer_metrics
from metanet.moe.convert import convert, dense_ffn_layers
from metanet.moe.module import MoEFFN
from metanet.moe.routing import select_experts
from metanet.partition import OperatingPoint
from metanet.partition.methods import LayerCalibration, assign_neurons
from metanet.partition.refine import neuron_energy, refine_by_coverage
from metanet.partition.routers import fit_router
from metanet.partition.partition import LayerPartition
from trained_lm import heldout_windows


@pytest.fixture(scope="module")
def lm(trained_lm):
    """(checkpoint, model, tokenizer, calibration windows [16, 128], held-out windows) of the tiny trained llama."""
    checkpoint = open_checkpoint(trained_lm)
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    from metanet.calib import calibration_windows, load_corpus

    calibration = calibration_windows(model, tokenizer, "llama", 2048, load_corpus(), "text")
    return checkpoint, model, tokenizer, calibration, heldout_windows(tokenizer)[:16]


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "opt", "gpt_neox", "llama"])
def test_the_walk_gives_every_blocks_ffn_inputs_as_one_forward_pass_does(tiny_models, model_type):
    tiny = tiny_models[model_type]
    family = open_checkpoint(tiny.path).family.name
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    expected = capture_ffn_inputs(tiny.model, family, ids, batch_size=2).layers
    walk = BlockWalk(tiny.model, family, ids, batch_size=2)
    for i in range(len(expected)):
        torch.testing.assert_close(walk.ffn_inputs(), expected[i], rtol=1e-5, atol=1e-6)
        walk.advance(rerun=i % 2 == 0)  # both ways of moving on give the same states for an unchanged block
    assert walk.done
    with pytest.raises(MetanetError, match="past the last"):
        walk.advance()


def test_the_walk_feeds_the_next_block_what_the_converted_block_writes(lm):
    checkpoint, model, _, calibration, _ = lm
    student = copy.deepcopy(model)
    point = OperatingPoint(16, 4)
    walk = BlockWalk(student, "llama", calibration[:4])
    walk.ffn_inputs()
    layer = checkpoint.layer(0)
    lp = LayerPartition(torch.arange(layer.d_ff) % 16, torch.randn(16, layer.d_model), torch.zeros(16))
    student.model.layers[0].mlp = MoEFFN.from_layer(layer, lp, point)
    walk.advance(rerun=True)
    converted = walk.ffn_inputs()
    expected = capture_ffn_inputs(student, "llama", calibration[:4]).layers[1]
    torch.testing.assert_close(converted, expected, rtol=1e-5, atol=1e-6)
    assert (converted - capture_ffn_inputs(model, "llama", calibration[:4]).layers[1]).abs().max() > 1e-3  # the dense model's differ


def test_compensation_with_every_expert_active_gives_back_the_dense_layer(lm):
    checkpoint, model, _, calibration, _ = lm
    layer = checkpoint.layer(1)
    x = capture_ffn_inputs(model, "llama", calibration[:4]).layers[1]
    assign = torch.arange(layer.d_ff) % 16
    fitted = refit_down_projection(layer, x, assign, torch.ones(x.shape[0], 16, dtype=torch.bool))
    torch.testing.assert_close(fitted.w_out, layer.w_out, rtol=1e-4, atol=1e-5)
    assert fitted.b_out.abs().max() < 1e-4


def test_compensation_lowers_the_held_out_error_of_the_same_routing(lm):
    checkpoint, model, _, calibration, heldout = lm
    inputs, held = capture_ffn_inputs(model, "llama", calibration).layers, capture_ffn_inputs(model, "llama", heldout).layers
    point = OperatingPoint(16, 4)
    for layer in checkpoint.layers():
        x = inputs[layer.index]
        calib = LayerCalibration(x, neuron_stats(layer, x))
        assign = assign_neurons("kmeans", layer, point, calib)
        lp = LayerPartition(assign, *fit_router("lsq", layer, assign, point, calib))
        fitted = refit_down_projection(layer, x, assign, select_experts(lp.scores(x), point))
        compensated = LayerPartition(lp.assign, lp.router_weight, lp.router_bias, w_out=fitted.w_out, b_out=fitted.b_out)
        before = layer_metrics(layer, lp, point, held[layer.index])["rel_error"]
        after = layer_metrics(layer, compensated, point, held[layer.index])["rel_error"]
        assert after < 0.9 * before, (layer.index, before, after)


def test_coverage_refinement_keeps_more_energy_keeps_sizes_and_leaves_shared_experts_alone(lm):
    checkpoint, model, _, calibration, _ = lm
    layer = checkpoint.layer(0)
    x = capture_ffn_inputs(model, "llama", calibration).layers[0]
    point = OperatingPoint(16, 6, shared=2)
    start = assign_neurons("kmeans", layer, point, LayerCalibration(x, neuron_stats(layer, x)))
    refined = refine_by_coverage(layer, x, start, point)
    assert torch.equal(torch.bincount(refined, minlength=16), torch.bincount(start, minlength=16))
    assert torch.equal(refined[start < 2], start[start < 2])

    def kept(assign):  # share of the energy the oracle selection keeps
        energy = neuron_energy(layer, x)
        per_expert = torch.zeros(x.shape[0], 16, dtype=torch.float64).index_add_(1, assign, energy)
        return ((per_expert * select_experts(per_expert, point)).sum() / per_expert.sum()).item()

    assert kept(refined) > kept(start) + 0.01


def test_a_permuted_layer_refines_to_the_permuted_partition(lm):
    checkpoint, model, _, calibration, _ = lm
    layer = checkpoint.layer(1)
    x = capture_ffn_inputs(model, "llama", calibration[:8]).layers[1]
    point = OperatingPoint(16, 4)
    start = torch.arange(layer.d_ff) % 16
    perm = torch.randperm(layer.d_ff, generator=torch.Generator().manual_seed(3))
    refined = refine_by_coverage(layer, x, start, point, iterations=3)
    assert torch.equal(refine_by_coverage(layer.permute_hidden(perm), x, start[perm], point, iterations=3), refined[perm])


def test_the_pipeline_at_k_equal_e_reproduces_the_dense_model(lm):
    checkpoint, model, tokenizer, _, heldout = lm
    from metanet.calib import load_corpus

    settings = ConversionSettings(method="cmoe", router="lsq", point=OperatingPoint(16, 16), calibration="mix", calib_tokens=1024)
    partition = convert_checkpoint(checkpoint, settings, model, tokenizer, load_corpus())
    assert partition.compensated and partition.info["calib_tokens"] == 1024 and partition.info["sequential"]
    with torch.no_grad():
        torch.testing.assert_close(convert(copy.deepcopy(model), "llama", partition)(heldout[:2]).logits, model(heldout[:2]).logits,
                                   rtol=1e-4, atol=1e-4)


def test_each_technique_lowers_the_error_of_the_converted_model(lm):
    checkpoint, model, tokenizer, _, heldout = lm
    from metanet.calib import load_corpus
    from metanet.eval.model_quality import dense_reference, model_quality

    reference = dense_reference(model, "llama", heldout)
    ppl = {}
    for name, techniques in {"none": {}, "compensate": {"compensate": True}, "all": {"compensate": True, "sequential": True, "refine": True}}.items():
        settings = ConversionSettings(method="kmeans", router="lsq", point=OperatingPoint(16, 4), calibration="text", calib_tokens=2048,
                                      **{"sequential": False, "refine": False, "compensate": False, **techniques})
        partition = convert_checkpoint(checkpoint, settings, model, tokenizer, load_corpus())
        ppl[name] = model_quality(model, "llama", partition, heldout, reference)["ppl_ratio"]
    assert ppl["all"] < ppl["compensate"] < ppl["none"], ppl


def test_a_data_free_conversion_needs_no_model_and_a_data_driven_one_says_so(lm):
    checkpoint = lm[0]
    free = ConversionSettings(method="kmeans", router="scaled", point=OperatingPoint(16, 4), sequential=False, refine=False, compensate=False)
    partition = convert_checkpoint(checkpoint, free)
    assert not partition.compensated and partition.info["calib_tokens"] == 0
    with pytest.raises(MetanetError, match="pass the model"):
        convert_checkpoint(checkpoint, ConversionSettings(point=OperatingPoint(16, 4)))


def test_a_plan_gives_each_layer_its_point_and_survives_saving(lm, tmp_path):
    checkpoint, model, tokenizer, _, _ = lm
    from metanet.calib import load_corpus
    from metanet.partition import Partition

    plan = [OperatingPoint(16, 12), OperatingPoint(16, 4)]
    settings = ConversionSettings(method="kmeans", router="lsq", point=OperatingPoint(16, 8), plan=plan, calibration="text", calib_tokens=1024,
                                  refine=False)
    partition = convert_checkpoint(checkpoint, settings, model, tokenizer, load_corpus())
    assert [partition.layer_point(i) for i in range(2)] == plan and partition.planned
    assert partition.active_fraction() == pytest.approx(0.5)
    loaded = Partition.load(partition.save(tmp_path / "part"))
    assert [loaded.layer_point(i) for i in range(2)] == plan
    assert all(torch.equal(a.w_out, b.w_out) for a, b in zip(loaded.layers, partition.layers))
    converted = convert(copy.deepcopy(model), "llama", loaded)
    assert [block.mlp.point.active for block in converted.model.layers] == [12, 4]


def _hand_made_sensitivity() -> Sensitivity:
    delta = torch.tensor([[0.9, 0.3, 0.1], [0.2, 0.05, 0.01], [1.5, 0.7, 0.2]], dtype=torch.float64)  # [3 blocks, k = 4, 8, 12]
    return Sensitivity(16, 0, [4, 8, 12], delta, 3.0, 4096)


def test_the_plan_is_the_best_allocation_under_the_budget_brute_force_agrees():
    sensitivity = _hand_made_sensitivity()
    table = {4: 0, 8: 1, 12: 2}

    def cost(ks):  # the model the plan optimises: measured values, linear in between, 0 at k = E
        total = 0.0
        for block, k in enumerate(ks):
            if k == 16:
                continue
            low = max(m for m in (4, 8, 12) if m <= k)
            high = min([m for m in (4, 8, 12) if m >= k] + [16])
            v_low = sensitivity.delta[block, table[low]].item()
            v_high = 0.0 if high == 16 else sensitivity.delta[block, table[high]].item()
            total += v_low if high == low else v_low + (v_high - v_low) * (k - low) / (high - low)
        return total

    for fraction in (0.3, 0.5, 0.6):
        plan = make_plan(sensitivity, active_fraction=fraction)
        brute = min((ks for ks in itertools.product(range(4, 17), repeat=3) if sum(ks) <= fraction * 48), key=cost)
        assert plan.active_fraction <= fraction
        assert math.log(plan.predicted_ppl_ratio) == pytest.approx(cost(brute)) == pytest.approx(cost(plan.active))
    cheapest = make_plan(sensitivity, max_ppl_ratio=2.0)
    assert cheapest.predicted_ppl_ratio <= 2.0
    assert make_plan(sensitivity, active_fraction=(sum(cheapest.active) - 1) / 48).predicted_ppl_ratio > 2.0  # one expert less is too much
    best, _ = frontier(sensitivity)
    assert best[48].item() == 0.0 and math.isinf(best[11].item())
    curve = pareto_curve(sensitivity)
    assert [f for f, _ in curve] == sorted(f for f, _ in curve) and [r for _, r in curve] == sorted((r for _, r in curve), reverse=True)


def test_plans_refuse_what_they_cannot_do(tmp_path):
    sensitivity = _hand_made_sensitivity()
    with pytest.raises(MetanetError, match="below the least measured"):
        make_plan(sensitivity, active_fraction=0.2)
    with pytest.raises(MetanetError, match="exactly one"):
        make_plan(sensitivity)
    with pytest.raises(MetanetError, match="≥ 1"):
        make_plan(sensitivity, max_ppl_ratio=0.5)
    plan = make_plan(sensitivity, active_fraction=0.5, method="cmoe", router="lsq")
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.active == plan.active and torch.equal(loaded.sensitivity.delta, sensitivity.delta)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(MetanetError, match="not a plan"):
        Plan.load(tmp_path / "broken.json")


def test_sensitivity_is_each_blocks_own_loss_and_leaves_the_model_as_it_was(lm):
    checkpoint, model, _, calibration, _ = lm
    from metanet.eval.model_quality import dense_reference

    before = {name: p.clone() for name, p in model.state_dict().items()}
    settings = ConversionSettings(method="kmeans", router="lsq", point=OperatingPoint(16, 8), refine=False)
    sensitivity = measure_sensitivity(checkpoint, model, calibration[8:], calibration[:8], settings, [4, 8, 12])
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    assert sensitivity.delta.shape == (2, 3) and bool((sensitivity.delta[:, 0] > sensitivity.delta[:, 2]).all())
    # block 1 alone at k=4, fitted and measured independently, gives the same loss increase
    layer = checkpoint.layer(1)
    x = capture_ffn_inputs(model, "llama", calibration[8:]).layers[1]  # fitted on the other windows
    calib = LayerCalibration(x, neuron_stats(layer, x))
    point = OperatingPoint(16, 4)
    assign = assign_neurons("kmeans", layer, OperatingPoint(16, 12), calib)
    lp = LayerPartition(assign, *fit_router("lsq", layer, assign, point, calib))
    fitted = refit_down_projection(layer, x, assign, select_experts(lp.scores(x), point))
    lp.w_out, lp.b_out = fitted.w_out, fitted.b_out
    carved = copy.deepcopy(model)
    carved.model.layers[1].mlp = MoEFFN.from_layer(layer, lp, point)
    expected = dense_reference(carved, "llama", calibration[:8]).mean() - dense_reference(model, "llama", calibration[:8]).mean()
    assert sensitivity.delta[1, 0].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert dense_ffn_layers(model, "llama")[1].fingerprint() == layer.fingerprint()
