"""Training the metanetwork on the tiny zoo: the loss falls, the model is written, logged, registered,
and predicts partitions that `metanet eval` reads; resume and bad input behave."""

import statistics
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from metanet.model.store import load_model, model_facts
from tests_support import assert_one_line_error
from training.metanet_data import ZooDataModule
from training.metanet_module import MetaNetModule

runner = CliRunner()
TRAIN_TINY = Path(__file__).parents[1] / "configs" / "train-tiny.yaml"


def train(zoo: Path, out: Path, uri: str, *args: str):
    return runner.invoke(app, ["train", "--config", str(TRAIN_TINY), "--zoo", str(zoo), "--out", str(out), "--tracking-uri", uri, *args])


@pytest.fixture(scope="module")
def trained(tiny_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    result = train(tiny_zoo, root / "run", uri)
    assert result.exit_code == 0, result.output
    return root / "run", uri


def epoch_means(uri: str, run_id: str, name: str) -> list[float]:
    from mlflow import MlflowClient

    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, name), key=lambda m: m.step)]


def test_training_runs_the_whole_loop_logs_and_registers_the_model(trained):
    out, uri = trained
    facts = model_facts(out / "model")
    losses = epoch_means(uri, facts["training"]["run_id"], "train_reconstruction_epoch")
    # 12 epochs of 2 steps, each on a freshly permuted and subsampled layer: the epoch means are noise around
    # the starting loss (test_training_steps_lower_the_loss_of_a_zoo_layer shows the learning)
    assert len(losses) == 12 and all(0 < loss < 1 for loss in losses), losses
    assert {"val_rel_error", "val_kmeans_rel_error"} <= set(facts["training"])
    assert "**mean**" in (out / "validation.md").read_text()
    assert (out / "curves.png").stat().st_size > 10_000
    registered = load_model("latest", uri)  # the registry's copy is the written model
    local = load_model(out / "model")
    for name, value in local.state_dict().items():
        assert torch.equal(value, registered.state_dict()[name]), name


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step outside a Trainer: nothing to log to
@pytest.mark.parametrize("straight_through", [True, False])
def test_training_steps_lower_the_loss_of_a_zoo_layer(tiny_zoo, straight_through):
    # one layer, unpermuted, at one operating point, data-free: a fixed objective (its synthetic router inputs are
    # seeded by the weights), so the training steps' effect is not hidden by the sampling noise of an epoch
    data = ZooDataModule(tiny_zoo, train_tokens=512, val_tokens=256, max_members=1)
    data.setup()
    sample = data.splits["val"][0]  # validation samples are not augmented
    torch.manual_seed(0)
    module = MetaNetModule(network={"width": 16, "depth": 2, "embedding": 8}, lr=0.01, experts=(8,), shared_probability=0.0,
                           stats_probability=0.0, straight_through=straight_through)
    optimizer = module.configure_optimizers()
    losses = []
    for step in range(80):
        optimizer.zero_grad()
        loss = module.training_step(sample, step)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert statistics.fmean(losses[-10:]) < 0.8 * losses[0], losses  # measured: 0.3–0.65 of the first


def test_a_trained_model_predicts_a_partition_that_eval_reads(trained, trained_lm, tmp_path):
    out, uri = trained
    checkpoint = str(trained_lm)
    result = runner.invoke(app, ["predict", checkpoint, "--model", str(out / "model"), "-E", "4", "-k", "2", "--width-multiple", "1",
                                 "--out", str(tmp_path / "p"), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", checkpoint, str(tmp_path / "p"), "--json", "--heldout-tokens", "256", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert '"method": "metanet"' in result.output and '"router": "metanet"' in result.output


def test_resume_continues_from_the_last_checkpoint(trained, tiny_zoo, tmp_path):
    out, uri = trained
    again = train(tiny_zoo, out, uri)
    assert again.exit_code == 2 and "--resume" in again.output  # never silently overwrites a run
    resumed = train(tiny_zoo, out, uri, "--resume", "--max-epochs", "13", "--no-register")
    assert resumed.exit_code == 0, resumed.output
    assert model_facts(out / "model")["training"]["steps"] > 0


@pytest.mark.parametrize("args, message", [
    (["--zoo", "no-such-zoo"], "is not a zoo"),
    (["--resume"], "no checkpoint to resume"),
    (["--experts", "8,x"], "comma-separated integers"),
])
def test_bad_training_input_fails_in_one_line_and_writes_nothing(tiny_zoo, tmp_path, args, message):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(TRAIN_TINY), "--zoo", str(tiny_zoo), "--out", str(out),
                                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_predict_without_a_model_in_the_folder_fails_in_one_line(tiny_models, tmp_path):
    result = runner.invoke(app, ["predict", str(tiny_models["gpt2"].path), "--model", str(tmp_path), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "is not a trained metanetwork" in result.output
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("device, message", [("tpu", "device must be auto, cpu or cuda, got 'tpu'"), ("cuda", "no CUDA device is visible")])
def test_predict_refuses_a_device_it_cannot_use_in_one_line(tiny_models, tmp_path, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    result = runner.invoke(app, ["predict", str(tiny_models["gpt2"].path), "-E", "4", "-k", "2", "--width-multiple", "1",
                                 "--device", device, "--out", str(tmp_path / "p"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert_one_line_error(result, message)
    assert not (tmp_path / "p").exists() and not (tmp_path / "mlflow.db").exists()  # refused before a run is logged
