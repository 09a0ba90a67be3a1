"""`metanet convert` and `metanet plan`: a dense checkpoint to a measured MoE checkpoint, and per-block operating points.

Options left out take the library's defaults (metanet.conversion.pipeline.ConversionSettings); the summary
tables print the values that ran.
"""

import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.app import app, console, err_console, progress_bar
from cli.apply_commands import FORMATS
from cli.checkpoint_commands import CHECKPOINT_HELP
from cli.config import config_option
from cli.partition_commands import (
    CORPUS_HELP, TRACKING_HELP, _check_calibration, _summary_table, _technique_rows, compensate_option, output_bias_option, plan_option,
    refine_option, ridge_option, sequential_option, techniques,
)

LIBRARY = "(default: the library's, ConversionSettings)"
METHOD_HELP = f"random | kmeans | joint | coact | cmoe | metanet | metanet-data {LIBRARY}."
ROUTER_HELP = f"centroid | scaled | cmoe | lsq | mlp | metanet {LIBRARY}."
CALIBRATION_HELP = f"text (--corpus) | generated (windows the model writes itself) | mix (half of each) {LIBRARY}."
MODEL_HELP = "Metanetwork for the metanet methods/router: a folder, models:/metanet/N or 'latest' (default: shipped)."


def _steps(progress):
    """The library's progress(description, total) → a function advancing that bar."""

    def step(description: str, total):
        task = progress.add_task(description, total=total)
        return lambda: progress.advance(task)

    return step


def _metanetwork(settings_methods: list[str], router: Optional[str], model: Optional[str], tracking_uri: Optional[str]):
    """The metanetwork when a method or the router is a metanet one (None: the shipped one is loaded by the library if needed)."""
    from metanet.partition.make import METANET_METHODS, METANET_ROUTER

    if not any(m in METANET_METHODS for m in settings_methods) and router != METANET_ROUTER:
        return None
    from metanet.model.store import load_model

    return load_model(model, tracking_uri)


@app.command()
def convert(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="MoE checkpoint folder to write (an earlier MoE checkpoint there is replaced atomically)."),
    active_fraction: Optional[float] = typer.Option(None, "--active-fraction", "-F", help=f"Share of the experts a token runs: k = F·E must be an integer {LIBRARY}."),
    experts: Optional[int] = typer.Option(None, "--experts", "-E", help=f"Experts per block, shared included {LIBRARY}."),
    shared: Optional[int] = typer.Option(None, "--shared", "-s", help=f"Always-active experts {LIBRARY}."),
    plan: Optional[Path] = plan_option(),
    method: Optional[str] = typer.Option(None, "--method", "-m", help=METHOD_HELP),
    router: Optional[str] = typer.Option(None, "--router", help=ROUTER_HELP),
    corpus: Optional[str] = typer.Option(None, "--corpus", help=CORPUS_HELP + " Named corpora: shakespeare, mlflow-docs."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help=CALIBRATION_HELP),
    calib_tokens: Optional[int] = typer.Option(None, "--calib-tokens", help=f"Calibration tokens {LIBRARY}."),
    sequential: Optional[bool] = sequential_option(None),
    refine: Optional[bool] = refine_option(None),
    compensate: Optional[bool] = compensate_option(None),
    ridge: Optional[float] = ridge_option(),
    output_bias: Optional[bool] = output_bias_option(),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32 for every written weight but the routers (default: the checkpoint's own)."),
    out_format: str = typer.Option("metanet", "--format", help="metanet | transformers: the folder `apply --format` writes (transformers: "
                                   "a Glm4MoeForCausalLM folder, compensated without an output bias unless told otherwise)."),
    heldout_tokens: int = typer.Option(4096, "--heldout-tokens", help="Held-out tokens the dense and MoE models are measured on."),
    device: str = typer.Option("auto", "--device", help="Where the model runs during conversion and measurement: auto | cpu | cuda."),
    seed: Optional[int] = typer.Option(None, "--seed", help=f"Seed of calibration windows and partitioning {LIBRARY}."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
    config: Optional[Path] = config_option(),
) -> None:
    """Convert a dense checkpoint into an MoE checkpoint with the library pipeline and measure both on held-out text."""
    from metanet.checkpoints import open_checkpoint
    from metanet.conversion.workflow import check_transformers_export, conversion_settings, convert_to_moe, load_plan, partition_json, prepare
    from metanet.device import resolve_device
    from metanet.errors import MetanetError
    from metanet.moe.checkpoint import DTYPES, check_destination
    from metanet.moe.export_transformers import check_destination as check_export_destination
    from metanet.tracking import log_artifacts, log_metrics, tracked_run

    if dtype is not None and dtype not in DTYPES:
        raise MetanetError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if calibration is not None:
        _check_calibration(calibration)
    if heldout_tokens < 1:
        raise MetanetError(f"--heldout-tokens must be ≥ 1 (the MoE is measured on held-out text), got {heldout_tokens}")
    if out_format not in FORMATS:
        raise MetanetError(f"--format must be one of {', '.join(FORMATS)}, got {out_format!r}")
    if out_format == "transformers" and output_bias is None:
        output_bias = False  # GLM-4-MoE holds no output bias; without one compensation measured the same (README)
    resolve_device(device)
    ckpt = open_checkpoint(checkpoint)
    settings = conversion_settings(ckpt, active_fraction=active_fraction, experts=experts, shared=shared, plan=load_plan(plan) if plan else None,
                                   method=method, router=router, calibration=calibration, calib_tokens=calib_tokens, seed=seed,
                                   **techniques(sequential, refine, compensate, ridge, output_bias))
    if out_format == "transformers":
        check_transformers_export(ckpt, settings)
        check_export_destination(ckpt, out)
    else:
        check_destination(ckpt, out)
    net = _metanetwork([settings.method], settings.router, model, tracking_uri)
    with err_console.status(f"loading {ckpt.path.name}, held-out text through the dense model"):
        prepared = prepare(ckpt, corpus, heldout_tokens, device, read_corpus=settings.calibration != "generated")
    point = settings.point
    params = {"checkpoint": checkpoint, "out": str(out), "method": settings.method, "router": settings.router or "default", "experts": point.experts,
              "active": point.active, "shared": point.shared, "plan": str(plan) if plan else "none", "calibration": settings.calibration,
              "calib_tokens": settings.calib_tokens, "seed": settings.seed, "corpus": corpus or "default", "heldout_tokens": heldout_tokens,
              "dtype": dtype or "source", "device": str(prepared.device), "format": out_format, **settings.techniques()}
    with tracked_run("convert", f"{settings.method}-{'plan' if plan else f'E{point.experts}-k{point.active}'}", params, tracking_uri) as run:
        with progress_bar() as progress:
            result = convert_to_moe(prepared, settings, out, DTYPES.get(dtype), net, progress=_steps(progress), out_format=out_format)
        log_metrics(result.metrics())
        with tempfile.TemporaryDirectory() as tmp:
            log_artifacts(partition_json(result.partition, tmp), out / "config.json")
    _print_conversion(checkpoint, settings, result, run.info.run_id)


def _print_conversion(checkpoint: str, settings, result, run_id: str) -> None:
    """The before/after table, then how the conversion ran."""
    part, quality, info = result.partition, result.quality, result.partition.info
    table = Table(title=f"dense and MoE on {result.heldout_tokens} held-out tokens")
    for column in ("", "dense", "MoE"):
        table.add_column(column, justify="left" if not column else "right", style="bold" if not column else None)
    if "ppl_ratio" in quality:
        table.add_row("perplexity", f"{quality['dense_ppl']:.4g}", f"{quality['moe_ppl']:.4g}")
        table.add_row("ppl_ratio", "1", f"{quality['ppl_ratio']:.4g}")
    else:
        table.add_row("embedding cosine with the dense model", "1", f"{quality['embedding_cosine']:.4g}")
    table.add_row("active FFN fraction", "1", f"{part.active_fraction():.4g}")
    console.print(table)
    point = part.point
    actives = [part.layer_point(i).active for i in range(len(part.layers))]
    console.print(_summary_table(f"conversion of {checkpoint}", {
        "method/router": f"{part.method}/{part.router}",
        "experts (shared)": f"{point.experts} ({point.shared})",
        "active k": ",".join(map(str, actives)) + " (per block, from the plan)" if part.planned else str(point.active),
        **_technique_rows(settings),
        "convert_s": info["convert_s"],
        "calib_tokens": f"{info['calib_tokens']} ({info.get('calib_source', 'none: data-free')})",
        "written": f"{result.out} ({result.written['size_mb']:.1f} MB, {result.written['dtype']})",
        "MLflow run": run_id,
    }))


@app.command()
def plan(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    active_fraction: Optional[float] = typer.Option(None, "--active-fraction", "-F", help="Budget: mean active share of the experts over blocks (give this or --max-ppl-ratio)."),
    max_ppl_ratio: Optional[float] = typer.Option(None, "--max-ppl-ratio", help="Or: the least active fraction whose modelled ppl_ratio is at most this (≥ 1)."),
    experts: Optional[int] = typer.Option(None, "--experts", "-E", help=f"Experts per block, shared included {LIBRARY}."),
    shared: Optional[int] = typer.Option(None, "--shared", "-s", help=f"Always-active experts {LIBRARY}."),
    methods: Optional[str] = typer.Option(None, "--methods", help=f"Comma-separated methods, one sensitivity and curve each; plan.json is the first one's {LIBRARY}."),
    router: Optional[str] = typer.Option(None, "--router", help=ROUTER_HELP),
    corpus: Optional[str] = typer.Option(None, "--corpus", help=CORPUS_HELP),
    calibration: Optional[str] = typer.Option(None, "--calibration", help=CALIBRATION_HELP),
    tokens: int = typer.Option(4096, "--tokens", help="Calibration tokens sensitivity is measured on (windows drawn with seed 1, never the held-out text)."),
    calib_tokens: Optional[int] = typer.Option(None, "--calib-tokens", help=f"Calibration tokens each block is fitted on, as convert's {LIBRARY}."),
    refine: Optional[bool] = refine_option(None),
    compensate: Optional[bool] = compensate_option(None),
    ridge: Optional[float] = ridge_option(),
    actives: Optional[str] = typer.Option(None, "--actives", help="Comma-separated active counts k to measure every block at (default: E/8, E/4, E/2, 3E/4)."),
    out: Path = typer.Option(Path("plan.json"), "--out", "-o", help="Plan file to write; pareto.png goes beside it.", dir_okay=False),
    device: str = typer.Option("auto", "--device", help="Where the model runs: auto | cpu | cuda."),
    seed: Optional[int] = typer.Option(None, "--seed", help=f"Seed of the partitioning {LIBRARY}."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
    config: Optional[Path] = config_option(),
) -> None:
    """Measure how much each block costs at each k and choose k per block under a budget: plan.json for `convert --plan`."""
    from metanet.checkpoints import open_checkpoint
    from metanet.conversion.workflow import check_plan_request, plan_blocks, plan_settings, prepare
    from metanet.device import resolve_device
    from metanet.errors import MetanetError
    from metanet.eval.plots import plot_pareto
    from metanet.tracking import log_artifacts, log_metrics, tracked_run

    if calibration is not None:
        _check_calibration(calibration)
    try:
        counts = [int(k) for k in actives.split(",")] if actives else None
    except ValueError:
        raise MetanetError(f"--actives takes comma-separated integers, got {actives!r}") from None
    if tokens < 1:
        raise MetanetError(f"--tokens must be ≥ 1, got {tokens}")
    resolve_device(device)
    ckpt = open_checkpoint(checkpoint)
    settings, counts = plan_settings(ckpt, experts=experts, shared=shared, actives=counts, router=router, calibration=calibration, seed=seed,
                                     calib_tokens=calib_tokens, refine=refine, compensate=compensate, ridge=ridge)  # carve each block as convert will
    method_list = [m for m in methods.split(",") if m] if methods is not None else [settings.method]
    check_plan_request(ckpt, settings, method_list, counts, active_fraction, max_ppl_ratio)
    net = _metanetwork(method_list, settings.router, model, tracking_uri)
    with err_console.status(f"loading {ckpt.path.name}"):
        prepared = prepare(ckpt, corpus, 0, device, read_corpus=settings.calibration != "generated")
    point = settings.point
    params = {"checkpoint": checkpoint, "methods": ",".join(method_list), "router": settings.router or "default", "experts": point.experts,
              "shared": point.shared, "actives": ",".join(map(str, counts)), "calibration": settings.calibration, "tokens": tokens,
              "budget": f"active_fraction ≤ {active_fraction:g}" if active_fraction is not None else f"ppl_ratio ≤ {max_ppl_ratio:g}",
              "out": str(out), **settings.techniques()}
    with tracked_run("plan", f"{method_list[0]}-E{point.experts}", params, tracking_uri) as run:
        with progress_bar() as progress:
            result = plan_blocks(prepared, settings, method_list, counts, tokens, active_fraction, max_ppl_ratio, net, progress=_steps(progress))
        chosen = result.plan
        path = chosen.save(out)
        pareto = plot_pareto(result.curves, result.uniform, out.with_name("pareto.png"), (chosen.active_fraction, chosen.predicted_ppl_ratio),
                             f"{Path(checkpoint).name}: E={point.experts}, {tokens} {settings.calibration} tokens")
        for method, method_plan in result.plans.items():
            log_metrics({"predicted_ppl_ratio": method_plan.predicted_ppl_ratio, "active_fraction": method_plan.active_fraction},
                        prefix="" if method_plan is chosen else f"{method}.")
        log_artifacts(path, pareto)
    _print_plan(result, counts)
    console.print(f"written: {path} (convert with `metanet convert {checkpoint} --plan {path} --out DIR`), {pareto}; MLflow run {run.info.run_id}")


def _print_plan(result, counts: list[int]) -> None:
    """Per block: the planned k and the block's ppl_ratio alone at each measured k; then each method's prediction."""
    chosen = result.plan
    sensitivity = result.sensitivities[chosen.method]
    table = Table(title=f"{chosen.method}/{chosen.router}: each block's ppl_ratio when it alone runs k of {chosen.experts} experts")
    table.add_column("block", justify="right")
    table.add_column("planned k", justify="right", style="bold")
    for k in sensitivity.actives:
        table.add_column(f"k={k}", justify="right")
    for block, (k, ratios) in enumerate(zip(chosen.active, sensitivity.ppl_ratio().tolist())):
        table.add_row(str(block), str(k), *(f"{r:.4g}" for r in ratios))
    console.print(table)
    summary = Table(title="plans (modelled: the blocks' log ppl_ratios add up)")
    for column in ("method/router", "active fraction", "predicted ppl_ratio"):
        summary.add_column(column, justify="left" if column == "method/router" else "right")
    for method, method_plan in result.plans.items():
        summary.add_row(f"{method}/{method_plan.router}" + (" (plan.json)" if method_plan is chosen else ""), f"{method_plan.active_fraction:.4g}",
                        f"{method_plan.predicted_ppl_ratio:.4g}")
    console.print(summary)
