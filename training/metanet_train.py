"""`metanet train`: fit the metanetwork on a zoo with Lightning, track it in MLflow, register it.

Output folder `out`:
    checkpoints/last.ckpt, checkpoints/best-*.ckpt   Lightning checkpoints (`resume` continues from last.ckpt)
    model/                                          the best model as metanet.safetensors + metanet.json
                                                    (metanet.model.store), what `metanet predict --model` reads
    validation.md                                   the validation layers: metanet vs the kmeans/scaled baseline
    curves.png                                      training loss and validation rel_error against steps

MLflow (Lightning's MLFlowLogger, experiment `experiment`): the resolved config as params, every
logged metric, the files above as artifacts, and the model as an MLflow pyfunc registered as
`metanet` (metanet.serving), unless `register` is off.

Devices: `accelerator` auto picks a GPU when there is one; `devices` > 1 or `num_nodes` > 1 makes
Lightning use DDP (strategy auto), and multi-node runs start through Lightning's own launchers
(torchrun, SLURM) with the same command on every node.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from metanet.errors import MetanetError

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    zoo: str = "zoo"
    out: str = "metanet-train"
    seed: int = 0
    # network
    width: int = 64
    depth: int = 4
    embedding: int = 32
    # optimisation
    lr: float = 3e-3
    weight_decay: float = 0.0
    w_reconstruction: float = 1.0
    w_teacher: float = 0.0
    w_load: float = 0.01
    w_importance: float = 0.1
    experts: str = "8,16,32"
    active_ratio: float = 0.25
    shared_probability: float = 0.3
    stats_probability: float = 0.5
    assign_tau: float = 0.05
    route_tau: float = 0.1
    synthetic_tokens: int = 1024
    straight_through: bool = True
    # data
    train_tokens: int = 1024
    val_tokens: int = 1024
    max_members: int = 0  # 0: every member of each split
    # trainer
    max_epochs: int = 3
    max_steps: int = -1
    val_every: int = 0  # validate every N training steps; 0: once per epoch
    patience: int = 3
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    gradient_clip: float = 1.0
    accumulate: int = 4
    experiment: str = "metanet-train"
    register: bool = True

    def expert_counts(self) -> tuple[int, ...]:
        try:
            counts = tuple(int(e) for e in str(self.experts).strip("[]").split(",") if e.strip())
        except ValueError:
            raise MetanetError(f"experts takes comma-separated integers, got {self.experts!r}") from None
        if not counts or min(counts) < 2:
            raise MetanetError(f"experts needs at least one count ≥ 2, got {self.experts!r}")
        return counts


def train(config: TrainConfig, resume: bool = False, tracking_uri: str | None = None) -> dict:
    """Train, write `out/model`, log and register; returns {run_id, model, val metrics, steps}."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import MLFlowLogger

    from metanet.model.store import save_model
    from metanet.tracking import resolve_tracking_uri, run_context
    from training.metanet_data import ZooDataModule
    from training.metanet_module import MetaNetModule

    out = Path(config.out)
    last = out / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise MetanetError(f"--resume: no checkpoint to resume from at {last}")
    if not resume and (out / "checkpoints").exists():
        raise MetanetError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    if not (Path(config.zoo) / "zoo.json").is_file():
        raise MetanetError(f"{config.zoo} is not a zoo (no zoo.json); build one with `metanet zoo build`")
    L.seed_everything(config.seed, workers=True, verbose=False)
    data = ZooDataModule(config.zoo, config.train_tokens, config.val_tokens, config.seed, config.max_members or None)
    module = MetaNetModule(
        network={"width": config.width, "depth": config.depth, "embedding": config.embedding},
        lr=config.lr, weight_decay=config.weight_decay,
        loss_weights={"reconstruction": config.w_reconstruction, "teacher": config.w_teacher, "load": config.w_load, "importance": config.w_importance},
        experts=config.expert_counts(), active_ratio=config.active_ratio, shared_probability=config.shared_probability,
        stats_probability=config.stats_probability, assign_tau=config.assign_tau, route_tau=config.route_tau,
        synthetic_tokens=config.synthetic_tokens, straight_through=config.straight_through, seed=config.seed,
    )
    uri = resolve_tracking_uri(tracking_uri)
    experiment, tags = run_context(config.experiment, uri)
    logger = MLFlowLogger(experiment_name=experiment, tracking_uri=uri, run_name=out.name, tags=tags)
    logger.log_hyperparams({f"config.{key}": value for key, value in asdict(config).items()})  # module hparams log unprefixed
    best = ModelCheckpoint(dirpath=out / "checkpoints", filename="best-{step}", monitor="val_rel_error", mode="min", save_last=True)
    trainer = L.Trainer(
        max_epochs=config.max_epochs, max_steps=config.max_steps, accelerator=config.accelerator,
        devices=_devices(config.devices), strategy=config.strategy, num_nodes=config.num_nodes, precision=config.precision,
        gradient_clip_val=config.gradient_clip, accumulate_grad_batches=config.accumulate,
        val_check_interval=config.val_every or None, check_val_every_n_epoch=None if config.val_every else 1,
        callbacks=[best, EarlyStopping(monitor="val_rel_error", mode="min", patience=config.patience), RichProgressBar(leave=False)],
        logger=logger, log_every_n_steps=10, enable_model_summary=False, deterministic=False,
    )
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume else None)
    if trainer.global_rank != 0:
        return {}
    if best.best_model_path:
        module = MetaNetModule.load_from_checkpoint(best.best_model_path, map_location=torch.device("cpu"))
    module = module.cpu().eval()
    with torch.no_grad():
        table = validation_table(module, data)
    facts = {"zoo": str(config.zoo), "steps": trainer.global_step, "run_id": logger.run_id, **table["means"]}
    model_folder = save_model(module.net, out / "model", training=facts)
    (out / "validation.md").write_text(table["markdown"])
    curves = plot_curves(logger, out / "curves.png")
    _log_results(logger, uri, [out / "validation.md", curves], model_folder, table["means"], config.register)
    return {"run_id": logger.run_id, "model": str(model_folder), "steps": trainer.global_step, **table["means"]}


def _devices(value: str) -> int | str:
    return int(value) if str(value).isdigit() else value


def validation_table(module, data) -> dict:
    """Every validation layer at E=16, k=4: the metanet prediction (data-free), its oracle routing and the
    kmeans/scaled baseline on the same held-back tokens. → {"rows", "means", "markdown"}"""
    from training.metanet_module import VAL_POINT

    rows = []
    for sample in data.splits["val"]:
        rows.append({"member": sample.member, "layer": sample.index, **module.layer_rel_errors(sample, VAL_POINT)})
    keys = ("rel_error", "oracle_rel_error", "kmeans_rel_error")
    means = {f"val_{key}": statistics.mean(row[key] for row in rows) for key in keys}
    lines = [
        f"# Validation: {len(rows)} layers of the zoo's val split, E=16, k=4, data-free",
        "",
        "rel_error on held-back tokens of each layer's calibration inputs (never trained on).",
        "",
        "| member | layer | metanet rel_error | metanet oracle_rel_error | kmeans/scaled rel_error |",
        "|---|---:|---:|---:|---:|",
        *(f"| {r['member']} | {r['layer']} | {r['rel_error']:.4f} | {r['oracle_rel_error']:.4f} | {r['kmeans_rel_error']:.4f} |" for r in rows),
        f"| **mean** | | **{means['val_rel_error']:.4f}** | **{means['val_oracle_rel_error']:.4f}** | **{means['val_kmeans_rel_error']:.4f}** |",
        "",
    ]
    return {"rows": rows, "means": means, "markdown": "\n".join(lines)}


def plot_curves(logger, path: Path) -> Path:
    """Training loss (smoothed) and validation rel_error against steps, from the run's metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = logger.experiment
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, axis in (("train_loss_step", left), ("train_reconstruction_step", left), ("val_rel_error", right), ("val_kmeans_rel_error", right)):
        history = sorted(client.get_metric_history(logger.run_id, name), key=lambda m: m.step)
        if history:
            steps, values = [m.step for m in history], [m.value for m in history]
            if name.startswith("train"):
                values = _smoothed(values)
            axis.plot(steps, values, label=name.removesuffix("_step"), marker="o" if name.startswith("val") else None)
    left.set(title="training (running mean of 20 logs)", xlabel="step", ylabel="loss")
    right.set(title="validation, E=16, k=4", xlabel="step", ylabel="rel_error")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smoothed(values: list[float], window: int = 20) -> list[float]:
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def _log_results(logger, tracking_uri: str, files: list[Path], model_folder: Path, means: dict, register: bool) -> None:
    import mlflow

    from metanet.model.store import REGISTERED_NAME

    client = logger.experiment
    for file in files:
        client.log_artifact(logger.run_id, str(file))
    client.log_artifact(logger.run_id, str(model_folder), artifact_path="metanet-model")
    for key, value in means.items():
        client.log_metric(logger.run_id, f"final_{key}", value)
    if register:
        from metanet.serving import log_pyfunc

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment_id=logger.experiment_id)  # start_run(run_id) refuses a run outside the active experiment
        with mlflow.start_run(run_id=logger.run_id, nested=mlflow.active_run() is not None):
            log_pyfunc(model_folder, registered_name=REGISTERED_NAME)
    log.info("model in %s, run %s", model_folder, logger.run_id)

