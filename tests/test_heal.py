"""Healing: distillation lowers ppl_ratio, trains only what it should, writes a verified MoE checkpoint, resumes."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from metanet.checkpoints import open_checkpoint
from metanet.errors import MetanetError
from metanet.heal import HealSettings, heal
from metanet.heal.distill import HealModule, balance_loss, router_surrogate
from metanet.heal.heal import work_folder
from metanet.moe import MoEFFN, apply, load
from metanet.partition import OperatingPoint
from metanet.partition.make import make_partition

runner = CliRunner()
#: A few hundred tokens: 6 steps of 4 windows of 32 tokens, measured every 2 steps on 512 held-out tokens.
SETTINGS = HealSettings(tokens=768, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1, eval_tokens=512, eval_every=256, checkpoint_every=2)
EXPERT_ATTRS = ("w_in", "w_gate", "w_out")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One play as a text file: the healing text is split into calibration and held-out chunks of it."""
    from metanet.calib import load_corpus

    file = tmp_path_factory.mktemp("corpus") / "play.txt"
    file.write_text(load_corpus()[0])
    return file


@pytest.fixture(scope="module")
def moe_dir(trained_lm, tmp_path_factory):
    """The trained tiny LLaMA converted at 4 of 16 experts with k-means experts and centroid routers."""
    ckpt = open_checkpoint(trained_lm)
    folder = tmp_path_factory.mktemp("moe") / "kmeans"
    apply(ckpt, make_partition(ckpt, "kmeans", OperatingPoint(16, 4)), folder)
    return folder


def tensors(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def moe_modules(model) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def test_routers_and_experts_heal_and_nothing_else_moves(moe_dir, trained_lm, corpus, tmp_path):
    out = tmp_path / "healed"
    result = heal(moe_dir, trained_lm, out, SETTINGS, corpus=corpus)

    before, after = result["before"], result["after"]
    assert result["tokens"] == 768 and result["steps"] == 6 and [h["tokens"] for h in result["history"]] == [0, 256, 512, 768]
    assert before["ppl_ratio"] > 1.05  # carving 4 of 16 experts costs real perplexity …
    assert after["ppl_ratio"] < before["ppl_ratio"] - 0.02 and after["rel_error"] < before["rel_error"]  # … and healing wins some back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed"]  # work folder gone, no temporary folder left

    source, healed = tensors(load(moe_dir)), tensors(load(out))  # load re-checks every tensor against checksums.json
    trainable = {name for name in source if ".mlp." in name and name.rsplit(".", 1)[1] in (*EXPERT_ATTRS, "router_weight", "router_bias")}
    assert len(trainable) == 2 * 5 and set(healed) == set(source)
    for name in source:
        if name in trainable:
            assert not torch.equal(healed[name], source[name]), name
        else:
            assert torch.equal(healed[name], source[name]), name  # frozen: bit-identical
    for module in moe_modules(load(out)):  # pad neurons (16 real of 64 per expert) stay exactly zero
        pad = module.order.reshape(16, 64) < 0
        assert module.w_in[pad].abs().sum() == 0 and module.w_gate[pad].abs().sum() == 0 and module.w_out.transpose(1, 2)[pad].abs().sum() == 0

    assert (out / "model.safetensors").read_bytes() == (moe_dir / "model.safetensors").read_bytes()
    checksums, source_checksums = (json.loads((f / "checksums.json").read_text())["files"] for f in (out, moe_dir))
    assert checksums["model.safetensors"] == source_checksums["model.safetensors"] and checksums["moe-layer-0000.safetensors"] != source_checksums["moe-layer-0000.safetensors"]
    healing = json.loads((out / "config.json").read_text())["moe"]["healing"]
    assert healing["tokens"] == 768 and healing["after"]["ppl_ratio"] == pytest.approx(after["ppl_ratio"])


def test_cli_routers_only_leaves_experts_identical_and_logs_curves(moe_dir, trained_lm, corpus, tmp_path):
    import mlflow

    from metanet.tracking import resolve_tracking_uri

    out = tmp_path / "healed"
    config = tmp_path / "heal.yaml"
    config.write_text("tokens: 768\nbatch-size: 4\nseq-len: 32\nlr: 0.01\nwarmup-steps: 1\neval-tokens: 512\neval-every: 384\n")
    result = runner.invoke(app, ["heal", str(moe_dir), "--teacher", str(trained_lm), "--out", str(out), "--corpus", str(corpus),
                                 "--train", "routers", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "ppl_ratio before → after" in result.stdout

    source, healed = tensors(load(moe_dir)), tensors(load(out))
    routers = {name for name in source if name.endswith(("router_weight", "router_bias"))}
    assert len(routers) == 4 and all(not torch.equal(healed[n], source[n]) for n in routers)
    assert all(torch.equal(healed[n], source[n]) for n in source if n not in routers)  # experts and every other tensor
    healing = json.loads((out / "config.json").read_text())["moe"]["healing"]
    assert healing["settings"]["train"] == "routers" and healing["after"]["ppl_ratio"] < healing["before"]["ppl_ratio"]

    client = mlflow.tracking.MlflowClient(resolve_tracking_uri())
    run = client.search_runs([client.get_experiment_by_name("heal").experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert run.data.params["train"] == "routers" and run.data.params["method"] == "kmeans" and run.data.params["data"] == "text"
    curve = client.get_metric_history(run.info.run_id, "ppl_ratio")
    assert [m.step for m in curve] == [0, 384, 768] and curve[-1].value == pytest.approx(healing["after"]["ppl_ratio"])
    assert len(client.get_metric_history(run.info.run_id, "rel_error")) == 3
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.json", "checksums.json"}


def test_bad_input_exits_2_and_writes_nothing(moe_dir, trained_lm, tiny_models, corpus, tmp_path):
    from tests_support import retrained_copy

    other = retrained_copy(trained_lm, tmp_path / "other")
    (tmp_path / "taken").mkdir()
    base = ["heal", str(moe_dir), "--corpus", str(corpus), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    cases = [
        (["--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "out")], "no such file or folder"),
        (["--teacher", str(other), "--out", str(tmp_path / "out")], "is not the checkpoint"),
        (["--teacher", str(tiny_models["gpt_neox"].path), "--out", str(tmp_path / "out")], "3-layer gpt_neox model"),
        (["--teacher", str(trained_lm), "--out", str(tmp_path / "taken")], "already exists"),
        (["--teacher", str(trained_lm), "--out", str(tmp_path / "out"), "--resume"], "no interrupted healing run"),
        (["--teacher", str(trained_lm), "--out", str(tmp_path / "out"), "--train", "everything"], "--train must be one of"),
        (["--teacher", str(trained_lm), "--out", str(tmp_path / "out"), "--data", "web"], "--data must be one of"),
        (["--teacher", str(trained_lm), "--out", str(tmp_path / "out"), "--data", "generated", "--pool-tokens", "64"], "less than one batch"),
    ]
    for extra, expected in cases:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
    result = runner.invoke(app, ["heal", str(trained_lm), "--teacher", str(trained_lm), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not an MoE checkpoint" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "taken"]  # no output, work folder or MLflow store


def test_interrupted_run_resumes_where_it_stopped(moe_dir, trained_lm, corpus, tmp_path, monkeypatch):
    out = tmp_path / "healed"
    step = HealModule.training_step

    def fails_at_step_4(self, batch, batch_idx):
        if self.global_step == 4:
            raise RuntimeError("power cut")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(HealModule, "training_step", fails_at_step_4)
    with pytest.raises(RuntimeError, match="power cut"):
        heal(moe_dir, trained_lm, out, SETTINGS, corpus=corpus)
    monkeypatch.setattr(HealModule, "training_step", step)
    assert not out.exists() and (work_folder(out) / "last.ckpt").is_file()
    with pytest.raises(MetanetError, match="pass --resume"):
        heal(moe_dir, trained_lm, out, SETTINGS, corpus=corpus)
    with pytest.raises(MetanetError, match="other lr"):
        heal(moe_dir, trained_lm, out, HealSettings(**{**SETTINGS.as_dict(), "lr": 1e-4}), corpus=corpus, resume=True)

    result = heal(moe_dir, trained_lm, out, SETTINGS, corpus=corpus, resume=True)

    assert result["resumed_from"] == 4 * 128 and result["tokens"] == 768 and result["steps"] == 6
    assert [h["tokens"] for h in result["history"]] == [0, 256, 512, 768]  # the points before the cut come back with the checkpoint
    assert result["after"]["ppl_ratio"] < result["before"]["ppl_ratio"]
    assert not work_folder(out).exists() and len(moe_modules(load(out))) == 2


def test_heals_on_windows_the_teacher_writes_and_resumes_on_the_same_pool(moe_dir, trained_lm, corpus, tmp_path, monkeypatch):
    """--data generated: the teacher writes the training windows (no corpus text is trained on), the pool is
    kept in the work folder and a resumed run trains on that very tensor instead of sampling again."""
    import metanet.heal.data as heal_data
    from metanet.heal.data import HealData, read_pool
    from metanet.heal.heal import POOL_FILE

    settings = HealSettings(**{**SETTINGS.as_dict(), "data": "generated", "pool_tokens": 512})  # 16 windows, cycled over 6 steps
    out = tmp_path / "healed"
    step, trained_on = HealModule.training_step, []

    def fails_at_step_4(self, batch, batch_idx):
        if self.global_step == 4:
            raise RuntimeError("power cut")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(heal_data, "pack_windows", lambda *args: pytest.fail("--data generated tokenised the corpus for training"))
    loader = HealData.train_dataloader
    monkeypatch.setattr(HealData, "train_dataloader", lambda self, b: trained_on.append(self.train_ids) or loader(self, b))
    monkeypatch.setattr(HealModule, "training_step", fails_at_step_4)
    with pytest.raises(RuntimeError, match="power cut"):
        heal(moe_dir, trained_lm, out, settings, corpus=corpus)
    monkeypatch.setattr(HealModule, "training_step", step)

    pool, meta = read_pool(work_folder(out) / POOL_FILE)
    assert pool.shape == (16, 32) and torch.equal(trained_on[-1], pool) and meta["seed"] == 0
    with pytest.raises(MetanetError, match="other data"):
        heal(moe_dir, trained_lm, out, SETTINGS, corpus=corpus, resume=True)
    monkeypatch.setattr(heal_data, "generated_windows", lambda *args, **kwargs: pytest.fail("the resumed run sampled a new pool"))
    result = heal(moe_dir, trained_lm, out, settings, corpus=corpus, resume=True)

    assert torch.equal(trained_on[-1], pool)  # the resumed run trained on the stored tensor
    assert result["resumed_from"] == 4 * 128 and result["tokens"] == 768
    assert result["after"]["ppl_ratio"] < result["before"]["ppl_ratio"] - 0.02 and result["after"]["rel_error"] < result["before"]["rel_error"]
    healing = json.loads((out / "config.json").read_text())["moe"]["healing"]
    assert healing["data"] == "generated" and healing["pool_tokens"] == 512 and healing["settings"]["data"] == "generated"
    assert not work_folder(out).exists()


def test_heals_a_compensated_per_block_planned_checkpoint(trained_lm, corpus, tmp_path):
    """The library pipeline's output (cmoe/lsq, sequential, refined, compensated down projections with b_out stored as
    moe.output_bias; k = 2 and 6 of 16 per block): b_out is trained with the experts, and the healed folder loads with
    each block's own point and the output bias."""
    from metanet.calib import load_corpus, load_model_and_tokenizer
    from metanet.conversion.pipeline import ConversionSettings, convert_checkpoint
    from metanet.moe.checkpoint import read_config

    checkpoint = open_checkpoint(trained_lm)
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    plan = [OperatingPoint(16, 2), OperatingPoint(16, 6)]
    settings = ConversionSettings(point=OperatingPoint(16, 4), plan=plan, calib_tokens=1024)
    partition = convert_checkpoint(checkpoint, settings, model, tokenizer, load_corpus(corpus))
    assert partition.compensated and partition.planned
    source = tmp_path / "moe"
    apply(checkpoint, partition, source)
    assert read_config(source)[1]["output_bias"]

    # lr 1e-3: the least-squares start is close to a local optimum, and SETTINGS' 3e-3 without warmup first knocks it off
    # (ppl_ratio 1.195 → 1.22 after 3 steps, below the start only after 12), where the kmeans start gains from any step.
    result = heal(source, trained_lm, tmp_path / "healed", HealSettings(**{**SETTINGS.as_dict(), "lr": 1e-3}), corpus=corpus)

    # rel_error (on the *teacher's* FFN inputs) is not asserted: it rises here (0.25 → 0.28), since the sequential,
    # compensated blocks and the healing loss both fit each block to the inputs the converted model gives it.
    assert result["after"]["ppl_ratio"] < result["before"]["ppl_ratio"] - 0.02
    _, section = read_config(tmp_path / "healed")
    assert [row["active"] for row in section["layers"]] == [2, 6] and section["output_bias"] and section["healing"]["tokens"] == 768
    before, after = moe_modules(load(source)), moe_modules(load(tmp_path / "healed"))
    assert [m.point for m in after] == [OperatingPoint(16, 2), OperatingPoint(16, 6)]
    for old, new in zip(before, after):
        assert old.b_out is not None and not torch.equal(old.b_out, new.b_out)  # the compensated output bias is healed too
        assert not torch.equal(old.w_out, new.w_out) and not torch.equal(old.router_weight, new.router_weight)


def test_router_surrogate_is_zero_and_gives_the_router_a_gradient():
    torch.manual_seed(0)
    point = OperatingPoint(4, 3, 1, width_multiple=1)  # 1 shared + 2 of 3 routed
    module = MoEFFN(w_in=torch.randn(4, 2, 6), w_out=torch.randn(4, 6, 2), router_weight=torch.randn(4, 6, requires_grad=True),
                    router_bias=torch.zeros(4), order=torch.arange(8), point=point, activation="relu")
    x = torch.randn(5, 6)
    scores = module.scores(x)
    surrogate = router_surrogate(module, x, scores)
    assert torch.equal(surrogate, torch.zeros(5, 6))
    surrogate.sum().backward()
    grad = module.router_weight.grad
    assert grad[0].abs().sum() == 0 and grad[1:].abs().sum() > 0  # the shared expert is never routed

    uniform = torch.tensor([[0.0, 3.0, 2.0, 1.0], [0.0, 1.0, 3.0, 2.0], [0.0, 2.0, 1.0, 3.0]])  # each routed expert chosen twice
    assert balance_loss(uniform, point).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.0, 3.0, 2.0, 1.0]] * 3)  # expert 3 never chosen
    assert balance_loss(skewed, point).item() > 1.0
