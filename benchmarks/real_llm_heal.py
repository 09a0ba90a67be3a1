"""Healing SmolLM2-135M-Instruct MoE checkpoints: held-out ppl_ratio against training tokens, on CPU.

For k = 4 and k = 8 of E = 16 experts (25% and 50% of the FFN active per token): convert the bundled
GGUF with the library pipeline's defaults (`ConversionSettings(point=OperatingPoint(16, k))`: whatever
method, router, calibration and techniques they name today; the settings used are recorded) — runs
`k4-…` — or with the per-block plan of the same average that benchmarks/real_llm.py measured
(real-llm.json's plan row; its k per block is recorded) — runs `plan4-…` and `plan8-…` —, `apply`, then
`metanet.heal.heal` (routers+experts, HealSettings defaults otherwise) with

    text        training windows from the calibration split of the Shakespeare plays
    generated   training windows the dense model writes itself (no corpus text is trained on)

measuring ppl_ratio on held-out Shakespeare every --eval-every training tokens, and at the end of a
run ppl_ratio on held-out mlflow-docs (Markdown guides shipped in the mlflow package: a domain no run
trains on) of the healed model, beside the unhealed MoE's.

Everything lives in a work folder (benchmarks/.work/real-llm-heal/, gitignored) kept between calls:

    k4/moe/, k4/partition/, k4/conversion.json    the converted checkpoint, once per k (plan4/: per plan)
    k4/healed-text/                               a finished run's healed checkpoint
    k4/.healed-text.heal/                         a run in progress: heal's resume point (and generated pool)
    mlflow.db, mlruns/                            the runs' curves (a resumed run continues its MLflow run)

Finished runs are appended to benchmarks/results/real-llm-heal.json; real-llm-heal.md is rebuilt from
them and from the MLflow curves of runs still in progress. Run (CPU, nice'd; runs in the order given):

    nice -n 10 .venv/bin/python -m benchmarks.real_llm_heal --runs k4-text,k4-generated,k8-text,k8-generated
    .venv/bin/python -m benchmarks.real_llm_heal --report          # rebuild the markdown only

Stop a run with `kill -INT PID`, or `kill -TERM PID` for one started in the background with `&` (a non-interactive
shell makes such jobs ignore SIGINT); heal saves a resume point on the way out (a hard kill loses at most
checkpoint_every steps); the same command continues every run where it stopped. A finished run is not
extended: heal its healed folder again, or remove it and its results row, to go further.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads stall on shared cores

import torch  # noqa: E402

from metanet.calib import load_corpus, load_model_and_tokenizer, split_documents, tokenize_documents  # noqa: E402
from metanet.checkpoints import open_checkpoint  # noqa: E402
from metanet.conversion.pipeline import ConversionSettings, convert_checkpoint  # noqa: E402
from metanet.eval.model_quality import dense_reference, quality_of  # noqa: E402
from metanet.heal import HealSettings, heal  # noqa: E402
from metanet.heal.heal import RECORD_FILE, RESUME_FILE, work_folder  # noqa: E402
from metanet.moe import apply, load  # noqa: E402
from metanet.partition import OperatingPoint  # noqa: E402

CHECKPOINT = "SmolLM2-135M-Instruct"
EXPERTS = 16
RUNS = ("k4-text", "k4-generated", "k8-text", "k8-generated", "plan4-text", "plan4-generated", "plan8-text", "plan8-generated")
MILESTONES = (100_000, 250_000, 500_000, 1_000_000)
BAR = 1.3  # the bar: ppl_ratio ≤ 1.3 at 25% active after ≤ 2M training tokens
RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / ".work" / "real-llm-heal"

log = logging.getLogger("real_llm_heal")


def parse(run: str) -> tuple[str, int, str, float | None]:
    """"k4-text" → ("k4", 4, "text", None); "plan4-text@3e-4" → ("plan4", 4, "text", 3e-4): the conversion's folder
    name, the (average) active experts, the healing data and the learning rate (None: HealSettings' default)."""
    conversion, rest = run.split("-", 1)
    data, _, lr = rest.partition("@")
    return conversion, int(conversion.removeprefix("plan").removeprefix("k")), data, float(lr) if lr else None


def known(run: str) -> bool:
    """A run of RUNS, optionally with "@LR" (another learning rate)."""
    return run.partition("@")[0] in RUNS


def heal_out(work: Path, run: str) -> Path:
    """work/<conversion>/healed-<data>[@<lr>]: one folder per run."""
    conversion, rest = run.split("-", 1)
    return work / conversion / f"healed-{rest}"


def measured_plan(k: int) -> list[int]:
    """k per block of the plan real-llm.json measured for the default pipeline at k of EXPERTS on average."""
    row = json.loads((RESULTS / "real-llm.json").read_text())["rows"].get(f"{CHECKPOINT}|cmoe|lsq|plan|{EXPERTS}|{k}|0|mix")
    if row is None:
        raise SystemExit(f"no plan row at k={k} in real-llm.json: run `python -m benchmarks.real_llm --rows headline` first")
    return row["plan"]


# -- conversion, once per k -----------------------------------------------------------------------
def converted(work: Path, conversion: str, k: int, dense) -> Path:
    """The MoE folder of the default pipeline at k of EXPERTS (or at its measured plan, for a "plan…" conversion),
    converted and applied on first use; conversion.json records the settings, the conversion time and the unhealed
    MoE's mlflow-docs ppl_ratio."""
    folder = work / conversion
    moe, record = folder / "moe", folder / "conversion.json"
    settings = ConversionSettings(point=OperatingPoint(EXPERTS, k))
    if conversion.startswith("plan"):
        settings.plan = [OperatingPoint(EXPERTS, active) for active in measured_plan(k)]
    wanted = json.loads(json.dumps(asdict(settings), default=str))
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved["settings"] != wanted:
            log.warning("k=%d: the cached conversion in %s used other settings than today's ConversionSettings defaults "
                        "(%s); remove that folder to convert again", k, folder, saved["settings"])
        return moe
    checkpoint, model, tokenizer, corpus = dense["checkpoint"], dense["model"], dense["tokenizer"], dense["corpus"]
    log.info("k=%d: converting %s with %s", k, CHECKPOINT, wanted)
    start = time.perf_counter()
    partition = convert_checkpoint(checkpoint, settings, model, tokenizer, corpus)
    convert_s = time.perf_counter() - start
    partition.save(folder / "partition")
    apply(checkpoint, partition, moe)
    docs = heldout_quality(moe, dense, "mlflow-docs")
    record.write_text(json.dumps({"settings": wanted, "convert_s": round(convert_s, 1), "partition_info": partition.info,
                                  "active_fraction": partition.active_fraction(), "mlflow_docs_ppl_ratio": docs,
                                  "mlflow_docs_tokens": dense["eval_tokens"]}, indent=1))
    log.info("k=%d: converted in %.0f s; unhealed mlflow-docs ppl_ratio %.4f", k, convert_s, docs)
    return moe


# -- held-out quality on another domain -----------------------------------------------------------
def heldout_quality(moe_dir: Path, dense: dict, corpus: str, tokens: int | None = None) -> float:
    """ppl_ratio of the MoE checkpoint `moe_dir` against the dense model on `tokens` held-out tokens of `corpus`."""
    tokens = tokens or dense["eval_tokens"]
    key = (corpus, tokens)
    if key not in dense["references"]:
        docs = split_documents(load_corpus(corpus), seed=0)[1]
        ids = tokenize_documents(dense["tokenizer"], docs, tokens, seq_len=HealSettings().seq_len, seed=0)
        dense["references"][key] = (ids, dense_reference(dense["model"], "llama", ids))
    ids, reference = dense["references"][key]
    with torch.no_grad():
        outputs = dense_reference(load(moe_dir), "llama", ids)
    return quality_of("llama", outputs, reference)["ppl_ratio"]


# -- one healing run --------------------------------------------------------------------------------
def run(work: Path, name: str, settings: HealSettings, dense: dict, uri: str) -> dict | None:
    """Heal (or continue healing) run `name`; returns its results row once finished."""
    conversion_name, k, data, lr = parse(name)
    moe = converted(work, conversion_name, k, dense)
    out = heal_out(work, name)
    if out.exists():
        log.info("%s: finished earlier (%s)", name, out)
        return None
    resume = (work_folder(out) / RESUME_FILE).is_file()
    log.info("%s: %s healing toward %d tokens", name, "continuing" if resume else "starting", settings.tokens)
    run_settings = HealSettings(**{**settings.as_dict(), "data": data, **({"lr": lr} if lr else {})})
    result = heal(moe, CHECKPOINT, out, run_settings, resume=resume, tracking_uri=uri)
    conversion = json.loads((work / conversion_name / "conversion.json").read_text())
    docs_after = heldout_quality(out, dense, "mlflow-docs", conversion["mlflow_docs_tokens"])  # the tokens "before" was measured on
    speeds = throughput(uri, result["run_id"])
    return {
        "run": name, "checkpoint": CHECKPOINT, "experts": EXPERTS, "active": k, "data": data,
        "conversion": conversion["settings"], "convert_s": conversion["convert_s"], "partition_info": conversion["partition_info"],
        "heal": run_settings.as_dict(), "tokens": result["tokens"], "history": result["history"],
        "mlflow_docs": {"before": conversion["mlflow_docs_ppl_ratio"], "after": docs_after, "tokens": conversion["mlflow_docs_tokens"]},
        **speeds, "last_segment": {"resumed_from": result["resumed_from"], "seconds": result["seconds"]},
        "machine": machine(), "date": str(datetime.date.today()), "mlflow_run_id": result["run_id"],
    }


def throughput(uri: str, run_id: str) -> dict:
    """Training tokens/s of a run from its MLflow curves: `train_tokens_per_s` the median of the per-step values
    (forward and backward only); `tokens_per_s` the median over consecutive held-out measurements of
    Δtokens / Δwall time (everything: training, evaluations, resume points; gaps between resumed segments drop out)."""
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    steps = [m.value for m in client.get_metric_history(run_id, "tokens_per_s")]
    evals = sorted((m.step, m.timestamp) for m in client.get_metric_history(run_id, "ppl_ratio"))
    rates = [(b[0] - a[0]) / ((b[1] - a[1]) / 1000) for a, b in zip(evals, evals[1:]) if b[1] > a[1] and b[0] > a[0]]
    return {"train_tokens_per_s": round(statistics.median(steps), 1) if steps else None,
            "tokens_per_s": round(statistics.median(rates), 1) if rates else None}


def in_progress(work: Path, uri: str) -> list[dict]:
    """Rows for runs with a work folder but no healed output yet, from their MLflow curves."""
    import mlflow

    rows = []
    for record in sorted(work.glob(f"*/.healed-*.heal/{RECORD_FILE}")):  # work_folder(heal_out(work, run))
        name = f"{record.parent.parent.name}-{record.parent.name.removeprefix('.healed-').removesuffix('.heal')}"
        _, k, data, _ = parse(name)
        if heal_out(work, name).exists():
            continue
        saved = json.loads(record.read_text())
        run_id = saved["run_id"]
        history = sorted((m.step, m.value) for m in mlflow.tracking.MlflowClient(uri).get_metric_history(run_id, "ppl_ratio"))
        if history:
            rows.append({"run": name, "active": k, "data": data, "history": [{"tokens": t, "ppl_ratio": v} for t, v in history],
                         "tokens": history[-1][0], "heal": saved["settings"], "in_progress": True, **throughput(uri, run_id), "machine": machine()})
    return rows


# -- report -----------------------------------------------------------------------------------------
def machine() -> str:
    return f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores (shared with other jobs, nice'd), no GPU, torch {torch.__version__}"


def milestone(history: list[dict], tokens: int) -> str:
    """ppl_ratio at the first measurement at or after `tokens` (within 5%: evaluations fall on whole batches)."""
    point = next((h for h in history if h["tokens"] >= tokens), None)
    if point is None or point["tokens"] > tokens * 1.05:
        return "—"
    return f"{point['ppl_ratio']:.3f}"


def lr_note(row: dict) -> str:
    lr = row.get("heal", {}).get("lr", HealSettings().lr)
    return "" if lr == HealSettings().lr else f", lr {lr:g}"


def report(rows: list[dict]) -> str:
    eval_tokens = ", ".join(f"{n:,}" for n in sorted({r["heal"]["eval_tokens"] for r in rows if "heal" in r})) or f"{HealSettings().eval_tokens:,}"
    lines = [
        "# Healing SmolLM2-135M-Instruct MoE checkpoints on CPU",
        "",
        f"Written {datetime.date.today()} by `benchmarks/real_llm_heal.py` (raw rows and curves: real-llm-heal.json). "
        "SmolLM2-135M-Instruct (bundled GGUF, dequantised to float32) converted at k of 16 experts with the library "
        "pipeline's default ConversionSettings (recorded per row in the JSON), k in every block or the per-block plan of the same "
        "average that real-llm.md measured, then healed with `metanet heal` "
        f"(routers+experts, HealSettings defaults: lr {HealSettings().lr:g} after 20 warmup steps, batches of 8 × 128 tokens; another lr where the data column names one). "
        f"ppl_ratio = perplexity of the MoE model / the dense model on {eval_tokens} held-out Shakespeare tokens "
        "(plays no run trains on); mlflow-docs: the same on held-out Markdown guides of the mlflow package, "
        "a domain no run trains on. `text`: training windows from the calibration plays; `generated`: windows "
        "the dense model writes itself (a pool sampled once per run, cycled), no corpus text trained on. "
        f"The bar: ppl_ratio ≤ {BAR} at 25% active after ≤ 2M training tokens.",
        "",
        "| conversion | active | data | before | 0.1M | 0.25M | 0.5M | 1M | best (tokens) | end (tokens) | mlflow-docs before → after | tokens/s train (end to end) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["active"], r["run"].startswith("plan"), r["data"] != "text", r["run"])):
        h = r["history"]
        docs = r.get("mlflow_docs")
        docs = f"{docs['before']:.3f} → {docs['after']:.3f}" if docs else "—"
        end = f"{h[-1]['ppl_ratio']:.3f} ({h[-1]['tokens']:,})"
        best = min(h, key=lambda point: point["ppl_ratio"])
        best = f"{best['ppl_ratio']:.3f} ({best['tokens']:,})"
        speed = f"{r['train_tokens_per_s'] or 0:.0f} ({r['tokens_per_s'] or 0:.0f})"
        status = f"in progress at {r['tokens']:,} tokens" if r.get("in_progress") else "finished"
        lines.append(
            f"| {'per-block plan' if r['run'].startswith('plan') else 'k everywhere'} | {r['active']} of {EXPERTS} ({r['active'] / EXPERTS:.0%}) | {r['data']}{lr_note(r)} | {h[0]['ppl_ratio']:.3f} | "
            f"{' | '.join(milestone(h, m) for m in MILESTONES)} | {best} | {end} | "
            f"{docs} | {speed} | {status} |"
        )
    machines = sorted({r["machine"] for r in rows})
    lines += ["", f"Machine: {'; '.join(machines) or machine()}. tokens/s train: median per optimizer step (teacher forward, "
              "student forward and backward); end to end: median between consecutive held-out evaluations (evaluations and "
              "resume points included). Milestones are the evaluation at or just after that many tokens (— : not reached yet).", ""]
    return "\n".join(lines)


def write_report(work: Path, uri: str) -> None:
    store = RESULTS / "real-llm-heal.json"
    rows = json.loads(store.read_text()) if store.exists() else []
    finished = {r["run"] for r in rows}
    rows += [r for r in in_progress(work, uri) if r["run"] not in finished]
    (RESULTS / "real-llm-heal.md").write_text(report(rows))
    log.info("wrote %s", RESULTS / "real-llm-heal.md")


def load_dense(eval_tokens: int) -> dict:
    checkpoint = open_checkpoint(CHECKPOINT)
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    return {"checkpoint": checkpoint, "model": model, "tokenizer": tokenizer, "corpus": load_corpus(), "references": {}, "eval_tokens": eval_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"Comma-separated, in order: {', '.join(RUNS)}; NAME@LR heals at learning rate LR.")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="Training tokens per run.")
    parser.add_argument("--eval-every", type=int, default=50_000)
    parser.add_argument("--eval-tokens", type=int, default=HealSettings().eval_tokens)
    parser.add_argument("--work", type=Path, default=WORK, help="Work folder kept between calls (default: benchmarks/.work/real-llm-heal).")
    parser.add_argument("--report", action="store_true", help="Rebuild real-llm-heal.md from the JSON and the runs in progress; run nothing.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import lightning.pytorch  # noqa: F401  (it sets its own log level on import; ours comes after)

    for noisy in ("lightning.pytorch", "alembic", "mlflow", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(args.work / 'mlflow.db').resolve()}"
    if args.report:
        write_report(args.work, uri)
        return
    for name in args.runs.split(","):
        if not known(name):
            parser.error(f"unknown run {name!r}; known: {', '.join(RUNS)}, each optionally with @LR (another learning rate)")
    settings = HealSettings(tokens=args.tokens, eval_every=args.eval_every, eval_tokens=args.eval_tokens)
    dense = load_dense(args.eval_tokens)
    store = RESULTS / "real-llm-heal.json"
    for name in args.runs.split(","):
        row = run(args.work, name, settings, dense, uri)
        if row is not None:
            rows = json.loads(store.read_text()) if store.exists() else []
            store.write_text(json.dumps([r for r in rows if r["run"] != name] + [row], indent=1))
            log.info("%s: ppl_ratio %.4f → %.4f after %d tokens", name, row["history"][0]["ppl_ratio"], row["history"][-1]["ppl_ratio"], row["tokens"])
        write_report(args.work, uri)


if __name__ == "__main__":
    main()
