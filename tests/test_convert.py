"""`metanet convert` and `metanet plan`, the pipeline flags of partition / compare / eval, and the plan's dynamic programme.

Conversions run on the trained tiny LLaMA (`trained_lm`: 2 blocks, f=256, 16 experts of 16 neurons) with few tokens.
"""

import itertools
import json
import math
import re

import mlflow
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from metanet.calib import load_corpus, load_model_and_tokenizer, split_documents, text_split, tokenize_documents
from metanet.checkpoints import open_checkpoint
from metanet.conversion.compensate import DEFAULT_RIDGE
from metanet.conversion.pipeline import ConversionSettings, convert_checkpoint
from metanet.conversion.plan import Plan, cost_table, make_plan
from metanet.conversion.sensitivity import Sensitivity
from metanet.eval.evaluate import evaluate
from metanet.moe import MoEFFN, load
from metanet.moe.checkpoint import read_config
from metanet.partition import LayerPartition, OperatingPoint, Partition
from tests_support import assert_one_line_error

runner = CliRunner()
TOKENS = ["--calib-tokens", "512", "--heldout-tokens", "512", "--device", "cpu"]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def heldout_nll(model, ids: torch.Tensor) -> float:
    """Mean next-token NLL over every position of the windows, computed here (not with metanet.eval)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def moe_modules(model) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def run_of(uri: str, experiment: str):
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


# -- convert ------------------------------------------------------------------------------------
def test_convert_at_every_expert_active_writes_a_folder_that_runs_as_the_dense_model(trained_lm, tmp_path):
    model, tokenizer = load_model_and_tokenizer(open_checkpoint(trained_lm))
    invoke("convert", trained_lm, "--out", tmp_path / "moe", "--active-fraction", "1", *TOKENS)
    loaded = load(tmp_path / "moe")
    assert [m.point.active for m in moe_modules(loaded)] == [16, 16]
    ids = tokenize_documents(tokenizer, split_documents(load_corpus())[1], 512)  # [4, 128]
    with torch.no_grad():  # whatever the library's defaults: at k = E a compensating refit is the dense projection again
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_convert_prints_the_ppl_ratio_an_independent_evaluation_of_the_folder_finds(trained_lm, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = invoke("convert", trained_lm, "--out", tmp_path / "moe", "--active-fraction", "0.25", "--tracking-uri", uri, *TOKENS)
    printed = float(re.search(r"ppl_ratio\s*│\s*1\s*│\s*([0-9.]+)", result.stdout).group(1))

    model, tokenizer = load_model_and_tokenizer(open_checkpoint(trained_lm))
    ids = tokenize_documents(tokenizer, split_documents(load_corpus())[1], 512)  # the held-out plays, as every metric uses
    ratio = math.exp(heldout_nll(load(tmp_path / "moe"), ids) - heldout_nll(model, ids))
    assert ratio > 1.001 and printed == pytest.approx(ratio, rel=1e-3)  # printed with 4 digits

    client, run = run_of(uri, "convert")
    assert run.data.metrics["ppl_ratio"] == pytest.approx(ratio, rel=1e-4) and run.data.metrics["active_fraction"] == 0.25
    assert run.info.run_id in result.stdout
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"partition.json", "config.json"}
    _, section = read_config(tmp_path / "moe")
    defaults = ConversionSettings()
    assert section["partition_info"].get("calib_source") == (defaults.calibration if defaults.uses_data else None)
    assert section["output_bias"] == defaults.compensate  # a compensated llama stores an output bias
    assert (section["experts"], section["active"]) == (16, 4)


def test_a_plan_with_its_own_k_per_block_goes_from_plan_json_to_each_moe_layer(trained_lm, tmp_path):
    plan = Plan(16, 0, [12, 4], 1.05, "kmeans", "centroid")
    plan.save(tmp_path / "plan.json")
    invoke("convert", trained_lm, "--plan", tmp_path / "plan.json", "--out", tmp_path / "moe", "--no-sequential", "--no-refine", *TOKENS)
    _, section = read_config(tmp_path / "moe")
    assert [row["active"] for row in section["layers"]] == [12, 4] and (section["method"], section["router"]) == ("kmeans", "centroid")
    loaded = load(tmp_path / "moe")
    assert [(m.point.experts, m.point.active, m.point.shared) for m in moe_modules(loaded)] == [(p.experts, p.active, p.shared) for p in plan.points()]
    assert loaded(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, loaded.config.vocab_size)


def test_compensation_lowers_heldout_rel_error_of_the_same_partition(trained_lm):
    checkpoint = open_checkpoint(trained_lm)
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    settings = ConversionSettings(method="cmoe", router="lsq", point=OperatingPoint(16, 4), calibration="text", calib_tokens=1024,
                                  sequential=False, refine=False, compensate=True)
    compensated = convert_checkpoint(checkpoint, settings, model, tokenizer, load_corpus())
    assert compensated.compensated
    plain = Partition(compensated.method, compensated.router, compensated.point, compensated.expert_width,
                      [LayerPartition(lp.assign, lp.router_weight, lp.router_bias) for lp in compensated.layers], compensated.fingerprints)
    heldout = text_split(model, tokenizer, "llama", "heldout", 1024, load_corpus())
    with_fit, without = (evaluate(checkpoint, p, heldout) for p in (compensated, plain))
    for fitted, original in zip(with_fit["layers"], without["layers"]):
        assert fitted["rel_error"] < original["rel_error"], (fitted, original)


# -- plan ---------------------------------------------------------------------------------------
def hand_made_sensitivity(seed: int = 0) -> Sensitivity:
    """3 blocks, E=8, measured at k = 2, 4, 6: costs that fall with k, block by block differently."""
    generator = torch.Generator().manual_seed(seed)
    steps = torch.rand(3, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 0.3, 3.0], dtype=torch.float64)[:, None]
    delta = steps.flip(1).cumsum(1).flip(1)  # [3 blocks, 3 actives], decreasing in k
    return Sensitivity(8, 0, [2, 4, 6], delta, 3.0, 1024)


def interpolated(sensitivity: Sensitivity, block: int, k: int) -> float:
    """delta of `block` at `k` by the plan's model, computed here: linear between measured points, 0 at k = E, none below."""
    known = [*zip(sensitivity.actives, sensitivity.delta[block].tolist()), (sensitivity.experts, 0.0)]
    for (k0, v0), (k1, v1) in itertools.pairwise(known):
        if k0 <= k <= k1:
            return v0 + (v1 - v0) * (k - k0) / (k1 - k0)
    return math.inf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_plan_is_the_brute_force_optimum_under_its_budget(seed):
    sensitivity = hand_made_sensitivity(seed)
    combos = list(itertools.product(range(2, 9), repeat=3))
    cost = {c: sum(interpolated(sensitivity, b, k) for b, k in enumerate(c)) for c in combos}
    assert torch.allclose(cost_table(sensitivity)[:, 2:], torch.tensor([[interpolated(sensitivity, b, k) for k in range(2, 9)] for b in range(3)],
                                                                        dtype=torch.float64))
    for fraction in (0.25, 0.4, 0.5, 0.7, 0.9, 1.0):
        plan = make_plan(sensitivity, active_fraction=fraction)
        budget = math.floor(fraction * 24 + 1e-9)
        best = min(value for c, value in cost.items() if sum(c) <= budget)
        assert sum(plan.active) <= budget and plan.active_fraction <= fraction
        assert cost[tuple(plan.active)] == pytest.approx(best, abs=1e-12)
        assert math.log(plan.predicted_ppl_ratio) == pytest.approx(best, abs=1e-12)
    for ratio in (1.01, 1.5, 3.0):
        plan = make_plan(sensitivity, max_ppl_ratio=ratio)
        least = min(sum(c) for c, value in cost.items() if value <= math.log(ratio) + 1e-12)
        assert sum(plan.active) == least and plan.predicted_ppl_ratio <= ratio * (1 + 1e-12)


def test_plan_command_writes_plan_json_and_pareto_png_and_the_plan_converts(trained_lm, tmp_path):
    out = tmp_path / "plans" / "plan.json"
    result = invoke("plan", trained_lm, "--active-fraction", "0.5", "--methods", "kmeans,random", "--router", "centroid",
                    "--tokens", "256", "--actives", "4,12", "--calibration", "text", "--no-refine", "--out", out, "--device", "cpu")
    plan = Plan.load(out)
    assert (plan.experts, plan.method, plan.router, len(plan.active)) == (16, "kmeans", "centroid", 2)
    assert plan.active_fraction <= 0.5 and plan.sensitivity.actives == [4, 12] and plan.sensitivity.tokens == 256
    assert (out.parent / "pareto.png").stat().st_size > 10_000
    assert "planned k" in result.stdout and "random/centroid" in result.stdout and f"{plan.predicted_ppl_ratio:.4g}" in result.stdout

    invoke("convert", trained_lm, "--plan", out, "--out", tmp_path / "moe", "--no-sequential", "--no-refine", "--no-compensate", *TOKENS)
    assert [m.point.active for m in moe_modules(load(tmp_path / "moe"))] == plan.active


# -- partition / eval / compare through the pipeline ---------------------------------------------
def test_partition_with_a_plan_and_compensation_and_eval_per_block(trained_lm, tmp_path):
    Plan(16, 0, [4, 16], 1.0, "kmeans", "centroid").save(tmp_path / "plan.json")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    invoke("partition", trained_lm, "--method", "kmeans", "--plan", tmp_path / "plan.json", "--compensate", "--calib-tokens", "512",
           "--out", tmp_path / "part")
    part = Partition.load(tmp_path / "part")
    assert [part.layer_point(i).active for i in range(2)] == [4, 16] and part.compensated and part.info["compensate"]
    assert not part.info["sequential"] and not part.info["refine"]

    result = invoke("eval", trained_lm, tmp_path / "part", "--per-block", "--json", "--heldout-tokens", "512", "--tracking-uri", uri)
    report = json.loads(result.stdout)
    assert report["planned"] and report["compensated"] and [row["active"] for row in report["layers"]] == [4, 16]
    first, second = (row["ppl_ratio"] for row in report["layers"])
    assert second == pytest.approx(1.0, abs=1e-4)  # block 1 runs every expert: alone it changes (almost) nothing
    assert first == pytest.approx(report["ppl_ratio"], rel=1e-3)  # so the whole model's cost is block 0's
    client, run = run_of(uri, "eval")
    assert "per_block_ppl_ratio.png" in {a.path for a in client.list_artifacts(run.info.run_id)}

    result = invoke("eval", trained_lm, tmp_path / "part", "--heldout-tokens", "512", "--tracking-uri", uri)
    rows = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.count("│") >= 3]
    assert rows[:2] == ["ppl_ratio", "rel_error"]  # the headline first, diagnostics after


def test_partition_defaults_stay_the_baseline_and_conflicts_with_a_plan_are_refused(tiny_models, tmp_path):
    path = tiny_models["llama"].path  # d_ff 88: 11 experts of 8
    invoke("partition", path, "--method", "kmeans", "-E", "11", "-k", "3", "--out", tmp_path / "part")
    info = Partition.load(tmp_path / "part").info
    assert (info["sequential"], info["refine"], info["compensate"], info["calib_tokens"]) == (False, False, False, 0)
    Plan(11, 0, [3, 5], 1.0).save(tmp_path / "plan.json")
    result = runner.invoke(app, ["partition", str(path), "--method", "kmeans", "-k", "4", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "p2")])
    assert_one_line_error(result, "--plan sets the operating point of every block; drop --active 4")
    assert not (tmp_path / "p2").exists()
    invoke("partition", path, "--method", "kmeans", "-E", "11", "--plan", tmp_path / "plan.json", "--out", tmp_path / "p2")
    assert [p.active for p in map(Partition.load(tmp_path / "p2").layer_point, range(2))] == [3, 5]


def test_compare_with_a_technique_converts_every_row_and_says_so(trained_lm, tmp_path):
    out = tmp_path / "cmp"
    invoke("compare", trained_lm, "--methods", "kmeans", "--compensate", "--calib-tokens", "512", "--heldout-tokens", "512", "--out", out)
    table = json.loads((out / "compare.json").read_text())["table"]
    technique = f"compensate(ridge={DEFAULT_RIDGE:g})"
    assert [(r["method"], r["router"], r["technique"]) for r in table] == [("kmeans", "centroid", technique)]
    markdown = (out / "compare.md").read_text()
    assert f"| kmeans | centroid | {technique} |" in markdown and "convert_checkpoint" in markdown


# -- bad input ----------------------------------------------------------------------------------
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_models, minilm_path, tmp_path):
    llama = tiny_models["llama"].path
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "moe"
    three_blocks = tmp_path / "three.json"
    Plan(16, 0, [4, 8, 12], 1.2, "cmoe", "lsq").save(three_blocks)
    foreign = tmp_path / "foreign.json"  # two blocks, like the llama, but measured on other weights
    Plan(11, 0, [4, 8], 1.2, "cmoe", "lsq", Sensitivity(11, 0, [4], torch.zeros(2, 1, dtype=torch.float64), 3.0, 512, ["a", "b"])).save(foreign)
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": 1, "experts": 16')
    cases = [
        (["convert", llama, "--active-fraction", "0.3", "-E", "11"], "nearest valid fractions: 0.272727 (k=3), 0.363636 (k=4)"),
        (["convert", llama, "--active-fraction", "0.05", "-E", "11", "-s", "1"], "nearest valid fractions: 0.181818 (k=2)"),
        (["convert", llama, "--plan", three_blocks], "the plan has 3 blocks and this checkpoint 2"),
        (["convert", llama, "--plan", broken], "not a plan written by `metanet plan`"),
        (["convert", llama, "--plan", foreign], "the plan was measured on another checkpoint"),
        (["convert", llama, "--plan", tmp_path / "none.json"], "no such plan file"),
        (["convert", llama, "--dtype", "int8"], "--dtype must be one of"),
        (["convert", llama, "-E", "11", "--active-fraction", "1", "--method", "spectral"], "unknown partition method 'spectral'"),
        (["plan", llama, "--max-ppl-ratio", "0.9", "-E", "11", "--out", tmp_path / "plan.json"], "--max-ppl-ratio must be ≥ 1"),
        (["plan", llama, "--out", tmp_path / "plan.json", "-E", "11"], "give exactly one of --active-fraction and --max-ppl-ratio"),
        (["plan", llama, "--active-fraction", "0.5", "-E", "11", "--actives", "2,11", "--out", tmp_path / "plan.json"], "--actives must lie between"),
        (["plan", minilm_path, "--active-fraction", "0.5", "--out", tmp_path / "plan.json"], "needs a causal LM, not an encoder"),
    ]
    for args, expected in cases:
        if args[0] == "convert":
            args = [*args, "--out", out]
        assert_one_line_error(runner.invoke(app, [str(a) for a in args] + ["--tracking-uri", uri]), expected)
    assert not out.exists() and not (tmp_path / "plan.json").exists() and not (tmp_path / "pareto.png").exists()
    assert not (tmp_path / "mlflow.db").exists()  # no run was started
