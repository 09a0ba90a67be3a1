"""`metanet train` and `metanet predict`: fit the metanetwork on a zoo; predict a partition with it."""

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from cli.app import app, console
from cli.checkpoint_commands import CHECKPOINT_HELP
from cli.config import config_option
from cli.partition_commands import (
    CORPUS_HELP, TRACKING_HELP, _summary_table, active_option, calibration_option, compensate_option, experts_option, partition_out_option, plan_option,
    point_options, refine_option, ridge_option, run_partition, sequential_option, shared_option, techniques, width_multiple_option,
)
from training.metanet_train import TrainConfig

DEFAULT = TrainConfig()
MODEL_HELP = "Trained metanetwork: a folder from `metanet train`, models:/metanet/N, or 'latest' (default: the shipped model)."


def _option(field: str, help: str):
    return typer.Option(getattr(DEFAULT, field), f"--{field.replace('_', '-')}", help=help)


@app.command()
def train(
    zoo: str = _option("zoo", "Zoo folder from `metanet zoo build`."),
    out: str = _option("out", "Output folder: checkpoints/, model/, validation.md, curves.png."),
    seed: int = _option("seed", "Seed of the network, data order and operating points."),
    width: int = _option("width", "Node state width."),
    depth: int = _option("depth", "Message-passing layers."),
    embedding: int = _option("embedding", "Size of the learned clustering embedding."),
    lr: float = _option("lr", "AdamW learning rate."),
    weight_decay: float = _option("weight_decay", "AdamW weight decay."),
    w_reconstruction: float = _option("w_reconstruction", "Weight of the functional reconstruction loss."),
    w_teacher: float = _option("w_teacher", "Weight of co-membership agreement with the best teacher."),
    w_load: float = _option("w_load", "Weight of the router load-balance loss."),
    w_importance: float = _option("w_importance", "Weight of the importance (shared experts) loss."),
    experts: str = _option("experts", "Comma-separated expert counts E to train on (k = E × active-ratio)."),
    active_ratio: float = _option("active_ratio", "Active experts per token as a share of E."),
    shared_probability: float = _option("shared_probability", "Share of steps with 2 shared experts."),
    stats_probability: float = _option("stats_probability", "Share of steps in data-aware mode (neuron statistics given)."),
    assign_tau: float = _option("assign_tau", "Temperature of the soft (Sinkhorn) assignment."),
    route_tau: float = _option("route_tau", "Temperature of the soft top-k, relative to the score spread."),
    synthetic_tokens: int = _option("synthetic_tokens", "Synthetic inputs the router is fitted on in each training step."),
    straight_through: bool = typer.Option(DEFAULT.straight_through, "--straight-through/--soft",
                                          help="Hard partition and top-k values with soft gradients, or the soft relaxations throughout."),
    train_tokens: int = _option("train_tokens", "Calibration tokens per training step (subsampled)."),
    val_tokens: int = _option("val_tokens", "Held-back tokens of each layer for validation."),
    max_members: int = _option("max_members", "Members per split (0: all)."),
    max_epochs: int = _option("max_epochs", "Epochs over the training layers."),
    max_steps: int = _option("max_steps", "Optimizer steps (-1: no limit)."),
    val_every: int = _option("val_every", "Validate every N training batches (0: once per epoch)."),
    patience: int = _option("patience", "Early stopping: validations without a better val_rel_error."),
    accelerator: str = _option("accelerator", "auto | cpu | gpu."),
    devices: str = _option("devices", "Devices per node (auto, or a count; > 1 trains with DDP)."),
    strategy: str = _option("strategy", "Lightning strategy (auto: DDP on more than one device)."),
    num_nodes: int = _option("num_nodes", "Nodes (launch with torchrun or SLURM, the same command on every node)."),
    precision: str = _option("precision", "Lightning precision, e.g. 32-true or bf16-mixed."),
    gradient_clip: float = _option("gradient_clip", "Gradient norm clip."),
    accumulate: int = _option("accumulate", "Layers per optimizer step (gradient accumulation)."),
    experiment: str = _option("experiment", "MLflow experiment."),
    register: bool = typer.Option(DEFAULT.register, "--register/--no-register", help="Register the model as `metanet` in the MLflow registry."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
    config: Optional[Path] = config_option(),
) -> None:
    """Train the metanetwork on a zoo (Lightning), log it to MLflow and register it as `metanet`."""
    from training.metanet_train import train as run_training

    values = locals()
    settings = TrainConfig(**{field.name: values[field.name] for field in dataclasses.fields(TrainConfig)})
    result = run_training(settings, resume=resume, tracking_uri=tracking_uri)
    console.print(_summary_table(f"metanetwork trained on {zoo}", {
        "steps": result["steps"], "val rel_error (metanet)": result["val_rel_error"],
        "val oracle_rel_error (metanet)": result["val_oracle_rel_error"], "val rel_error (kmeans/scaled)": result["val_kmeans_rel_error"],
        "model": result["model"], "MLflow run": result["run_id"],
    }))
    console.print(f"predict with it: metanet predict CHECKPOINT --model {result['model']} --out DIR")


@app.command()
def predict(
    ctx: typer.Context,
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    experts: int = experts_option(),
    active: int = active_option(),
    shared: int = shared_option(),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Text for the data-aware mode: " + CORPUS_HELP.split(" (")[0] + " (default: none, data-free)."),
    calibration: str = calibration_option(),
    calib_tokens: int = typer.Option(4096, "--calib-tokens", help="Calibration tokens in data-aware mode."),
    router: Optional[str] = typer.Option(None, "--router", help="metanet (default) or any router of `metanet partition`, e.g. lsq with --corpus."),
    sequential: bool = sequential_option(False),
    refine: bool = refine_option(False),
    compensate: bool = compensate_option(False),
    ridge: Optional[float] = ridge_option(),
    plan: Optional[Path] = plan_option(),
    width_multiple: int = width_multiple_option(),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="Where the metanetwork runs: auto (a GPU when there is one) | cpu | cuda."),
    out: Path = partition_out_option(),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
    config: Optional[Path] = config_option(),
) -> None:
    """Predict a Partition for a checkpoint with the metanetwork: data-free, or data-aware with --corpus or --calibration generated."""
    data_aware = corpus is not None or calibration != "text"
    run_partition(checkpoint, "metanet-data" if data_aware else "metanet", router, point_options(ctx, plan), width_multiple, plan,
                  techniques(sequential, refine, compensate, ridge), corpus, calibration, calib_tokens, seed, out, tracking_uri,
                  experiment="predict", model=model, device=device)
