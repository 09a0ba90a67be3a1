"""`metanet run`: the whole job in one command — zoo, training, prediction, MoE checkpoint, comparison.

The steps are the very commands a user runs by hand, in order, each with its own progress bars
and its own MLflow run, all nested under one parent run (metanet.tracking.PARENT_RUN_ENV):

    zoo build  →  train  →  predict CHECKPOINT  →  apply  →  bench  →  compare (baselines vs metanet)

Folders under --out: zoo/, train/, partition/, moe/, compare/. A step whose output already exists
is reused (zoo build skips finished members; train is skipped when train/model exists), so a run
that was stopped continues where it was. `make demo` is this command with configs/pipeline.yaml.
"""

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.app import app, console, err_console
from cli.checkpoint_commands import CHECKPOINT_HELP
from cli.config import config_option
from cli.partition_commands import TRACKING_HELP
from metanet.errors import MetanetError

CONFIGS = Path(__file__).parents[1] / "configs"
BENCH_TOKENS = "1,64"  # decode and a short prefill: enough to see where the MoE stands on this machine
#: The summary's columns (metric → short header, so the table fits 80 columns).
SUMMARY_COLUMNS = {"rel_error": "rel_error", "oracle_rel_error": "oracle", "embedding_cosine": "emb. cos", "ppl_ratio": "ppl ratio",
                   "convert_s": "convert s", "calib_tokens": "calib tok"}


def _step(name: str, args: list[str]) -> None:
    """Run one metanet command in this process; a failing step stops the pipeline with its exit code."""
    from typer.main import get_command

    err_console.rule(f"[bold]{name}[/]: metanet {' '.join(args)}")
    code = get_command(app).main(args, prog_name="metanet", standalone_mode=False)
    if code:
        raise MetanetError(f"pipeline step `{name}` failed (exit code {code}); fix it and run again: finished steps are reused")


@app.command("run")
def run(
    checkpoint: str = typer.Option("all-MiniLM-L6-v2", "--checkpoint", help=CHECKPOINT_HELP),
    zoo_config: Path = typer.Option(CONFIGS / "zoo-tiny.yaml", "--zoo-config", help="Config of `metanet zoo build`."),
    train_config: Path = typer.Option(CONFIGS / "train-tiny.yaml", "--train-config", help="Config of `metanet train`."),
    experts: int = typer.Option(16, "--experts", "-E"),
    active: int = typer.Option(4, "--active", "-k"),
    shared: int = typer.Option(0, "--shared", "-s"),
    baselines: str = typer.Option("kmeans,coact", "--baselines", help="Methods compared with the metanetwork."),
    workers: int = typer.Option(2, "--workers", help="Parallel zoo members."),
    out: Path = typer.Option(Path("pipeline-output"), "--out", "-o", help="Folder of every step's output."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
    config: Optional[Path] = config_option(),
) -> None:
    """Build a zoo, train the metanetwork, predict and apply a partition, time it, compare it with baselines."""
    from metanet.tracking import PARENT_RUN_ENV, resolve_tracking_uri, tracked_run

    uri = resolve_tracking_uri(tracking_uri)
    point = ["-E", str(experts), "-k", str(active), "-s", str(shared)]
    tracking = ["--tracking-uri", uri]
    params = {"checkpoint": checkpoint, "zoo_config": str(zoo_config), "train_config": str(train_config), "experts": experts,
              "active": active, "shared": shared, "baselines": baselines, "out": str(out)}
    with tracked_run("pipeline", f"{Path(checkpoint).name}-E{experts}-k{active}-s{shared}", params, uri) as parent:
        os.environ[PARENT_RUN_ENV] = parent.info.run_id
        try:
            _step("zoo", ["zoo", "build", "--config", str(zoo_config), "--out", str(out / "zoo"), "--workers", str(workers), *tracking])
            if (out / "train" / "model").is_dir():
                err_console.print(f"train: reusing the model in {out / 'train' / 'model'}")
            else:
                _step("train", ["train", "--config", str(train_config), "--zoo", str(out / "zoo"), "--out", str(out / "train"), *tracking])
            model = str(out / "train" / "model")
            _step("predict", ["predict", checkpoint, "--model", model, *point, "--out", str(out / "partition"), *tracking])
            _step("apply", ["apply", checkpoint, str(out / "partition"), "--out", str(out / "moe"), *tracking])
            _step("bench", ["bench", str(out / "moe"), "--tokens", BENCH_TOKENS, *tracking])
            _step("compare", ["compare", checkpoint, "--methods", f"{baselines},metanet", "--model", model, *point,
                              "--out", str(out / "compare"), *tracking])
        finally:
            del os.environ[PARENT_RUN_ENV]
    _summary(out, checkpoint, uri, parent.info.run_id)


def _summary(out: Path, checkpoint: str, uri: str, parent_id: str) -> None:
    from mlflow import MlflowClient

    report = json.loads((out / "compare" / "compare.json").read_text())
    columns = {name: label for name, label in SUMMARY_COLUMNS.items() if any(name in row for row in report["table"])}
    table = Table(title=f"{checkpoint}: the metanetwork next to the baselines (held-out text)")
    table.add_column("method/router", style="bold", no_wrap=True)
    for label in columns.values():
        table.add_column(label, justify="right")
    for row in sorted(report["table"], key=lambda r: r["rel_error"]):
        table.add_row(f"{row['method']}/{row['router']}", *(f"{row[c]:.4g}" if c in row else "–" for c in columns))
    console.print(table)
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100)
    steps = {}
    for child in children:
        steps.setdefault(child.data.tags.get("metanet.command", "?"), []).append(child.info.run_id)
    console.print(f"MLflow: parent run {parent_id} with {len(children)} step runs "
                  + ", ".join(f"{name}: {ids[0]}" + (f" (+{len(ids) - 1})" if len(ids) > 1 else "") for name, ids in sorted(steps.items())))
    backend = f"--backend-store-uri {uri}" if not uri.startswith("http") else ""
    console.print(f"look next: mlflow ui {backend}   ·   metanet runs show {parent_id}   ·   MoE checkpoint: {out / 'moe'}")
