"""`metanet apply`: write the MoE checkpoint of a partition (grouped experts, routers, every other tensor);
`metanet export`: write an MoE checkpoint (a healed one too) as a transformers-native folder."""

from pathlib import Path
from typing import Optional

import typer

from cli.app import app, console, progress_bar
from cli.checkpoint_commands import CHECKPOINT_HELP
from cli.partition_commands import TRACKING_HELP, _summary_table

FORMATS = ("metanet", "transformers")


@app.command("apply")
def apply_command(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    partition_dir: Path = typer.Argument(..., help="A folder written by `metanet partition` for this checkpoint."),
    out: Path = typer.Option(..., "--out", "-o", help="MoE checkpoint folder to write (an earlier one there is replaced atomically)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32 for every weight but the routers (default: the checkpoint's own)."),
    out_format: str = typer.Option("metanet", "--format", help="metanet: the MoE checkpoint `metanet.moe.load` reads (every family); "
                               "transformers: a Glm4MoeForCausalLM folder that plain transformers loads (gated llama-family decoders; README)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
) -> None:
    """Write a GPU-ready MoE checkpoint (experts grouped and padded, routers, all other tensors) or, with --format transformers, a transformers-native MoE folder; verified before success."""
    from metanet.checkpoints import open_checkpoint
    from metanet.errors import MetanetError
    from metanet.moe.checkpoint import DTYPES, apply, check_partition
    from metanet.partition import Partition
    from metanet.tracking import log_artifacts, log_metrics, tracked_run

    if dtype is not None and dtype not in DTYPES:
        raise MetanetError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out_format not in FORMATS:
        raise MetanetError(f"--format must be one of {', '.join(FORMATS)}, got {out_format!r}")
    ckpt = open_checkpoint(checkpoint)
    part = Partition.load(partition_dir)
    if out_format == "transformers":
        from metanet.moe.export_transformers import check_exportable

        check_exportable(ckpt, part)  # what GLM-4-MoE cannot express is refused before the fingerprints are read
    with progress_bar() as progress:  # refuse a partition made for other weights before anything is logged or written
        task = progress.add_task("checking fingerprints", total=ckpt.n_layers)
        check_partition(ckpt, part, progress=lambda: progress.advance(task))
    point = part.point
    params = {
        "checkpoint": checkpoint, "partition": str(partition_dir), "out": str(out), "dtype": dtype or "source",
        "method": part.method, "router": part.router, "experts": point.experts, "active": point.active,
        "shared": point.shared, "expert_width": part.expert_width, "format": out_format,
    }
    if out_format == "transformers":
        _export(ckpt, part, checkpoint, partition_dir, out, DTYPES.get(dtype), params, tracking_uri)
        return
    with tracked_run("apply", f"{part.method}-{part.router}", params, tracking_uri):
        log_artifacts(partition_dir / "partition.json")  # the partition's summary, per layer
        with progress_bar() as progress:
            task = progress.add_task("writing expert layers", total=ckpt.n_layers)
            summary = apply(ckpt, part, out, DTYPES.get(dtype), progress=lambda: progress.advance(task))
        log_metrics({key: value for key, value in summary.items() if isinstance(value, (int, float)) and not isinstance(value, bool)})
        log_artifacts(out / "config.json", out / "checksums.json")
    console.print(_summary_table(f"MoE checkpoint of {checkpoint}", {
        "partition": f"{part.method}/{part.router}",
        "experts × width": f"{point.experts} × {summary['expert_width']} (padded to {summary['padded_width']})",
        "active (shared)": f"{point.active} ({point.shared})",
        "layers": summary["n_layers"], "dtype": summary["dtype"],
        "files / tensors": f"{summary['files']} / {summary['tensors']}", "size_mb": summary["size_mb"],
        "write_s": summary["write_s"], "verify_s": summary["verify_s"], "written": str(out),
    }))


def _export(ckpt, part, checkpoint: str, partition_dir: Path, out: Path, dtype, params: dict, tracking_uri: Optional[str]) -> None:
    """`apply --format transformers`: the GLM-4-MoE folder of metanet.moe.export_transformers, tracked like apply."""
    from metanet.moe.export_transformers import ARCHITECTURE, export_transformers
    from metanet.tracking import log_artifacts, log_metrics, tracked_run

    with tracked_run("apply", f"{part.method}-{part.router}-transformers", params, tracking_uri):
        log_artifacts(partition_dir / "partition.json")
        with progress_bar() as progress:
            task = progress.add_task(f"writing {ARCHITECTURE} blocks", total=ckpt.n_layers)
            summary = export_transformers(ckpt, part, out, dtype, progress=lambda: progress.advance(task))
        log_metrics({key: value for key, value in summary.items() if isinstance(value, (int, float)) and not isinstance(value, bool)})
        log_artifacts(out / "config.json")
    _print_export(f"{ARCHITECTURE} folder of {checkpoint}", f"{part.method}/{part.router}", summary)


@app.command("export")
def export_command(
    moe_dir: Path = typer.Argument(..., help="An MoE checkpoint folder written by `metanet apply`, `convert` or `heal`."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (an earlier export or MoE checkpoint there is replaced atomically)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32 for every weight but the routers (default: the checkpoint's own)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
) -> None:
    """Write an MoE checkpoint (healed or not) as a Glm4MoeForCausalLM folder that plain transformers, vLLM and SGLang load (gated llama-family decoders; README)."""
    from metanet.errors import MetanetError
    from metanet.moe.checkpoint import DTYPES, read_config
    from metanet.moe.export_transformers import ARCHITECTURE, export_moe_checkpoint
    from metanet.tracking import log_artifacts, log_metrics, tracked_run

    if dtype is not None and dtype not in DTYPES:
        raise MetanetError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _, moe = read_config(moe_dir)
    label = f"{moe.get('method')}/{moe.get('router')}"
    params = {"moe_checkpoint": str(moe_dir), "out": str(out), "dtype": dtype or "stored", "method": moe.get("method"), "router": moe.get("router"),
              "experts": moe["experts"], "active": moe["active"], "shared": moe["shared"], "format": "transformers"}
    with tracked_run("export", f"{moe.get('method')}-{moe.get('router')}-transformers", params, tracking_uri):
        with progress_bar() as progress:
            task = progress.add_task(f"writing {ARCHITECTURE} blocks", total=moe["n_layers"])
            summary = export_moe_checkpoint(moe_dir, out, DTYPES.get(dtype), progress=lambda: progress.advance(task))
        log_metrics({key: value for key, value in summary.items() if isinstance(value, (int, float)) and not isinstance(value, bool)})
        log_artifacts(out / "config.json")
    _print_export(f"{ARCHITECTURE} folder of {moe_dir}", label, summary)


def _print_export(title: str, partition: str, summary: dict) -> None:
    sparse = summary["experts"] is not None
    console.print(_summary_table(title, {
        "partition": partition,
        "blocks (dense)": f"{summary['n_layers']} ({summary['dense_blocks']})",
        "experts × width": f"{summary['experts']} × {summary['expert_width']}" if sparse else "-",
        "active (shared)": _active_cell(summary) if sparse else "-",
        "dtype": summary["dtype"], "tensors": summary["tensors"], "size_mb": summary["size_mb"],
        "write_s": summary["write_s"], "verify_s": summary["verify_s"], "written": summary["out"],
    }))


def _active_cell(summary: dict) -> str:
    """k (s) of the sparse blocks, or for a per-block plan the range of k and the zero-expert padding that holds it."""
    sparse = list(zip(summary["active"], summary["shared"]))[summary["dense_blocks"]:]
    if len(set(sparse)) == 1:
        return "{} ({})".format(*sparse[0])
    actives = [k for k, _ in sparse]
    return (f"{min(actives)}–{max(actives)} by block (shared ≤ {max(s for _, s in sparse)}); every block runs {summary['experts_per_token']} "
            f"of {summary['routed_experts']} routed experts, zero experts padding the smaller k")
