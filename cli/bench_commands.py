"""`metanet bench`: how much faster an MoE checkpoint (or its transformers export) runs than the dense model it came from, here."""

import json
import tempfile
from pathlib import Path
from typing import Optional

import typer

from cli.app import app, console, progress_bar
from cli.partition_commands import CORPUS_HELP, TRACKING_HELP, _summary_table


@app.command("bench")
def bench_command(
    moe_dir: Path = typer.Argument(..., help="An MoE checkpoint folder written by `metanet apply` (or `heal`), or a transformers export (`metanet export`)."),
    tokens: str = typer.Option("1,8,64,512", "--tokens", help="Comma-separated tokens per FFN call T (decode is 1, prefill hundreds)."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Tokens generated end to end (causal LMs)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32 (default: the checkpoint's own)."),
    dense: Optional[str] = typer.Option(None, "--dense", help="Dense checkpoint to compare end to end (default: the source the MoE config names)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help=CORPUS_HELP),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
) -> None:
    """Time every FFN layer (MoE vs dense) per token count on real held-out text, and generation end to end."""
    from rich.table import Table

    from metanet.checkpoints import open_checkpoint
    from metanet.errors import MetanetError
    from metanet.eval.plots import plot_speedup
    from metanet.device import resolve_device
    from metanet.eval.speed import check_counts, exported_reference, measure_speed
    from metanet.moe.checkpoint import DTYPES, read_config
    from metanet.moe.export_transformers import is_export
    from metanet.tracking import log_artifacts, log_metrics, tracked_run

    try:
        counts = [int(t) for t in tokens.split(",")]
    except ValueError:
        raise MetanetError(f"--tokens takes comma-separated integers, got {tokens!r}") from None
    if dtype is not None and dtype not in DTYPES:
        raise MetanetError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_counts(counts, new_tokens)  # bad input is refused before a run is logged
    if is_export(moe_dir):
        exported_reference(moe_dir, dense)  # its dense FFNs come from the source: refused here when it is gone
    else:
        read_config(moe_dir)  # MetanetError unless an MoE checkpoint
    resolve_device(device)
    if dense is not None:
        open_checkpoint(dense)
    params = {"moe_dir": str(moe_dir), "tokens": tokens, "new_tokens": new_tokens, "device": device, "dtype": dtype or "stored",
              "dense": dense or "source", "corpus": corpus or "default"}
    with tracked_run("bench", moe_dir.name, params, tracking_uri), progress_bar() as progress:

        def steps(description: str, total: int):
            task = progress.add_task(description, total=total)
            return lambda: progress.advance(task)

        result = measure_speed(moe_dir, counts, new_tokens, device, DTYPES.get(dtype), dense, corpus, progress=steps)
        for row in result["ffn"]:
            log_metrics({key: value for key, value in row.items() if key not in ("tokens", "paths")}, prefix=f"T{row['tokens']}.")
        e2e = result["end_to_end"]
        log_metrics({"moe_tokens_per_s": e2e["moe"]["tokens_per_s"], **({"dense_tokens_per_s": e2e["dense"]["tokens_per_s"],
                     "e2e_speedup": e2e["speedup"]} if "dense" in e2e else {}),
                     **{f"{kind}_tokens_per_s": e2e[kind]["tokens_per_s"] for kind in ("moe_steps", "dense_steps") if kind in e2e},
                     **({"steps_speedup": e2e["steps_speedup"]} if "steps_speedup" in e2e else {})})
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "bench.json").write_text(json.dumps(result, indent=1))
            plot = plot_speedup(result["ffn"], Path(tmp) / "speedup.png", f"{moe_dir.name} on {result['device']} ({result['dtype']})")
            log_artifacts(Path(tmp) / "bench.json", plot)

    active = result["active"] if isinstance(result["active"], list) else [result["active"]]  # an export lists k per block
    k = f"{min(active)}–{max(active)} by block" if len(set(active)) > 1 else active[0]
    table = Table(title=f"FFN time, all {result['layers']} layers: {moe_dir.name} ({result['format']}, E={result['experts']}, k={k}) "
                        f"on {result['device']}, {result['dtype']}")
    graphs = any("graph_speedup" in row for row in result["ffn"])  # CUDA, T ≤ 16: also replayed as CUDA graphs
    for column in ("T", "dense ms", "MoE ms", "speed-up", *(("CUDA-graph speed-up",) if graphs else ()), "path"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for row in result["ffn"]:
        graph_cell = (f"{row['graph_speedup']:.2f}×" if "graph_speedup" in row else "—",) if graphs else ()
        table.add_row(str(row["tokens"]), f"{row['dense_ms']:.3f}", f"{row['moe_ms']:.3f}", f"{row['speedup']:.2f}×", *graph_cell,
                      _shares(row["paths"]))
    console.print(table)
    console.print(_summary_table(f"end to end: {e2e['kind']} {e2e['input_shape']}", {
        "MoE tokens/s": e2e["moe"]["tokens_per_s"],
        "dense tokens/s": e2e["dense"]["tokens_per_s"] if "dense" in e2e else "not measured (dense source not found; pass --dense)",
        **({"speed-up": f"{e2e['speedup']:.2f}×"} if "dense" in e2e else {}),
        **_steps_rows(e2e),
    }))


def _shares(paths: dict[str, int]) -> str:
    """The path's name when every call took it, else each path with its share of the calls."""
    total = sum(paths.values())
    return next(iter(paths)) if len(paths) == 1 else ", ".join(f"{path} {100 * n / total:.0f}%" for path, n in paths.items())


def _steps_rows(e2e: dict) -> dict:
    """Summary rows of the static-cache decode steps (causal LMs): tokens/s and their speed-up when comparable."""
    if "moe_steps" not in e2e:
        return {}
    how = lambda steps: "CUDA graph" if steps["graph"] else "eager"  # noqa: E731
    rows = {f"MoE decode steps tokens/s ({how(e2e['moe_steps'])})": e2e["moe_steps"]["tokens_per_s"]}
    if "dense_steps" in e2e:
        rows[f"dense decode steps tokens/s ({how(e2e['dense_steps'])})"] = e2e["dense_steps"]["tokens_per_s"]
        rows["steps speed-up"] = (f"{e2e['steps_speedup']:.2f}×" if "steps_speedup" in e2e
                                  else "not comparable: the steps ran differently (CUDA graph and eager) or do not reproduce generate's tokens for this family")
    return rows
