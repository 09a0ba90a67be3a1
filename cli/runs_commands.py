"""`metanet runs` (recent MLflow runs with key metrics) and `metanet runs show RUN_ID`."""

import json
from typing import Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from cli.app import app, console

TRACKING_HELP = "MLflow tracking URI: sqlite:///…, a folder, or a server http://host:port (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."
#: Key metrics shown per run in the listing's table (--json gives them all).
TABLE_METRICS = 4

runs_app = typer.Typer(help="Recent MLflow runs of every metanet command, and one run in full.", no_args_is_help=False)
app.add_typer(runs_app, name="runs")


@runs_app.callback(invoke_without_command=True)
def runs(
    ctx: typer.Context,
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="Only this experiment (partition, eval, compare, apply, zoo, …)."),
    limit: int = typer.Option(20, "--limit", "-n", help="Newest runs to list."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list (every key metric) instead of a table."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
) -> None:
    """List recent runs, newest first: run id, experiment, name, status, start time, key metrics."""
    ctx.obj = tracking_uri  # `metanet runs --tracking-uri U show ID` reads the same store
    if ctx.invoked_subcommand is not None:
        return
    from metanet.runs import list_runs

    rows = list_runs(experiment, limit, tracking_uri)
    if as_json:
        typer.echo(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    if not rows:
        console.print("no runs yet: every metanet command that computes logs one")
        return
    title = f"latest {len(rows)} runs" + (f" of {experiment}" if experiment else "")
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("run id / experiment · name", no_wrap=True)
    table.add_column("started", overflow="fold")
    table.add_column("key metrics", overflow="fold", min_width=16)
    for row in rows:
        shown = [f"{name}={value:.4g}" for name, value in list(row.metrics.items())[:TABLE_METRICS]]
        if len(row.metrics) > TABLE_METRICS:
            shown.append(f"(+{len(row.metrics) - TABLE_METRICS} more)")
        status = escape(row.status) if row.status == "FINISHED" else f"[bold red]{escape(row.status)}[/]"
        table.add_row(f"{row.run_id}\n[dim]{escape(row.experiment)} · {escape(row.name)}[/]",
                      f"{_local(row.start_time, '%m-%d %H:%M')}\n{status}", "\n".join(shown), end_section=True)
    console.print(table)


@runs_app.command()
def show(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="A run id from `metanet runs`."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
) -> None:
    """One run's params, metrics and artifact paths."""
    from metanet.runs import show_run

    run = show_run(run_id, tracking_uri or ctx.obj)
    if as_json:
        typer.echo(json.dumps(run.to_dict(), indent=2))
        return
    facts = {"experiment": run.experiment, "name": run.name, "status": run.status,
             "started": _local(run.start_time), "ended": _local(run.end_time), "artifact uri": run.artifact_uri}
    console.print(_key_value_table(f"run {run.run_id}", facts))
    console.print(_key_value_table("params", run.params))
    console.print(_key_value_table("metrics", {k: f"{v:.6g}" for k, v in run.metrics.items()}))
    artifacts = Table(title="artifacts", show_header=False, title_justify="left")
    artifacts.add_column("path", overflow="fold")
    for path in run.artifacts or ["(none)"]:
        artifacts.add_row(path)
    console.print(artifacts)


def _key_value_table(title: str, rows: dict[str, str]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold", overflow="fold")
    table.add_column("value", overflow="fold")
    for key, value in rows.items() or [("(none)", "")]:
        table.add_row(key, value)
    return table


def _local(moment, form: str = "%Y-%m-%d %H:%M:%S") -> str:
    """A UTC datetime in local time (strftime `form`), or '–'."""
    return moment.astimezone().strftime(form) if moment else "–"
