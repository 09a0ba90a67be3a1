"""`metanet inspect` and `metanet graph`: what a checkpoint holds, and its parameter graphs."""

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.app import app, console, progress_bar
from cli.config import config_option

CHECKPOINT_HELP = "HF folder, .safetensors/.bin file with config.json beside it, .gguf file, or a bundled name (all-MiniLM-L6-v2, SmolLM2-135M-Instruct)."


@app.command()
def inspect(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Family, depth, widths, activation and parameter counts; reads and checks every FFN layer."""
    from metanet.checkpoints import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    with progress_bar() as progress:
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
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
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
