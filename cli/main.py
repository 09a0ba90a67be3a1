"""Entry point of the `metanet` console script.

Heavy libraries (torch, torch_geometric, lightning, mlflow) are imported inside the
commands, so `metanet --help` answers at once.
"""

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from cli.config import config_option
from metanet import __version__
from metanet.errors import MetanetError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class MetanetGroup(TyperGroup):
    """Turns a MetanetError anywhere below into one `error: …` line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MetanetError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=MetanetGroup,
    no_args_is_help=True,
    add_completion=False,
    help="Turn dense transformer FFNs into Mixture-of-Experts with a graph metanetwork.",
)


def _version(value: bool) -> None:
    if value:
        console.print(f"metanet {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err_console, transient=True,
    )


@app.command()
def inspect(
    checkpoint: str = typer.Argument(..., help="HF folder, .safetensors/.bin file with config.json beside it, .gguf file, or a bundled name (all-MiniLM-L6-v2)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Family, depth, widths, activation and parameter counts; reads and checks every FFN layer."""
    from metanet.checkpoints import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    with _progress() as progress:
        for _ in progress.track(ckpt.layers(), total=ckpt.n_layers, description="checking FFN layers"):
            pass
    summary = ckpt.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=f"{checkpoint}", show_header=False)
    table.add_column("fact", style="bold")
    table.add_column("value", overflow="fold")
    for key in ("path", "format", "family", "model_type", "n_layers", "d_model", "d_ff", "activation", "gated", "norm"):
        table.add_row(key, str(summary[key]))
    params = summary["parameters"]
    table.add_row("parameters", f"{params['total']:,}")
    table.add_row("FFN parameters", f"{params['ffn']:,} ({params['ffn'] / params['total']:.0%})")
    console.print(table)


@app.command()
def graph(
    checkpoint: str = typer.Argument(..., help="Checkpoint path or bundled name (see `metanet inspect --help`)."),
    layer: int = typer.Option(0, "--layer", "-l", help="Block index of the FFN layer."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the ParamGraph here (torch file, loads with ParamGraph.load)."),
    graphml: Optional[Path] = typer.Option(None, "--graphml", help="Also write the graph as GraphML (small layers only)."),
    max_edges: int = typer.Option(1_000_000, "--max-edges", help="Refuse GraphML export above this many edges."),
    normalize: bool = typer.Option(True, "--normalize/--raw", help="Divide weights by power-of-two scales (exactly undoable)."),
    config: Optional[Path] = config_option(),
) -> None:
    """Build the parameter graph of one FFN layer; print its node and edge counts."""
    from metanet.atomic import atomic_path
    from metanet.checkpoints import open_checkpoint
    from metanet.graphs import ParamGraph

    ckpt = open_checkpoint(checkpoint)
    param_graph = ParamGraph.from_ffn(ckpt.layer(layer), normalize=normalize)
    nx_graph = param_graph.to_networkx(max_edges=max_edges) if graphml else None  # refuse before writing anything
    if out:
        param_graph.save(out)
    if nx_graph is not None:
        import networkx as nx

        with atomic_path(graphml) as tmp:
            nx.write_graphml(nx_graph, tmp)
    table = Table(title=f"layer {layer} of {checkpoint}", show_header=False)
    for key, value in param_graph.counts().items():
        table.add_row(key.replace("_", " "), f"{value:,}")
    table.add_row("input edge channels", str(1 if param_graph.edge_gate is None else 2))
    table.add_row("scales (s_in, s_out)", f"2^{param_graph.scale_exp_in}, 2^{param_graph.scale_exp_out}")
    for path in (out, graphml):
        if path:
            table.add_row("written", str(path))
    console.print(table)
