"""Healing: quality before and after distilling an MoE model back toward its dense teacher, per partition method.

For each checkpoint × operating point × method: partition with the method's own router, `apply`,
then `metanet.heal.heal` for --tokens training tokens (routers+experts, configs/heal.yaml
defaults otherwise), measuring held-out ppl_ratio (embedding_cosine for encoders) every
--eval-every tokens. Milestones 0.1M / 1M / 5M are read off that one curve (constant learning
rate after warmup, so a point of a longer run is the run of that length). Each run is appended
to benchmarks/results/healing.json; the markdown table is rebuilt from everything measured so far.

Run (one model and budget per call; nice'd, CPU):
    nice -n 15 .venv/bin/python -m benchmarks.healing --checkpoint ZOO/members/NAME --tokens 100000
    nice -n 15 .venv/bin/python -m benchmarks.healing --checkpoint all-MiniLM-L6-v2 --tokens 25000 --eval-every 5000
--methods takes any partition method, `metanet` included once it has trained weights.
"""

import argparse
import datetime
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from metanet.checkpoints import open_checkpoint
from metanet.heal import HealSettings, heal
from metanet.model.predict import calibrate
from metanet.moe import apply
from metanet.partition import OperatingPoint
from metanet.partition.make import make_partition, needs_calibration, resolve_router
from metanet.partition.methods import LayerCalibration

POINTS = {"E16-k4": OperatingPoint(16, 4, 0), "E16-s2-k4": OperatingPoint(16, 4, 2)}
POINT_TITLES = {"E16-k4": "E=16, k=4", "E16-s2-k4": "2 shared + 2 of 14 routed"}
MILESTONES = (100_000, 1_000_000, 5_000_000)
PPL_TARGET = 1.10
CALIB_TOKENS = 4096
RESULTS = Path(__file__).parent / "results"


def calibration(checkpoint, seed: int = 0) -> dict[int, LayerCalibration]:
    """Calibration FFN inputs and neuron statistics of every layer (CALIB_TOKENS of the calibration split)."""
    return calibrate(checkpoint, None, CALIB_TOKENS, seed)[0]


def run(checkpoint_spec: str, point_name: str, method: str, settings: HealSettings) -> dict:
    checkpoint = open_checkpoint(checkpoint_spec)
    router = resolve_router(method, None)
    calib = calibration(checkpoint) if needs_calibration(method, [router]) else None
    partition = make_partition(checkpoint, method, POINTS[point_name], router, calibration=calib)
    with tempfile.TemporaryDirectory(prefix="heal-bench-") as tmp:
        apply(checkpoint, partition, Path(tmp) / "moe")
        result = heal(Path(tmp) / "moe", checkpoint_spec, Path(tmp) / "healed", settings)
    return {
        "checkpoint": Path(checkpoint_spec).name, "family": checkpoint.family.name, "point": point_name, "method": method, "router": router,
        "train": settings.train, "tokens": result["tokens"], "seconds": result["seconds"], "history": result["history"],
    }


def milestone(history: list[dict], key: str, tokens: int) -> str:
    """The value at the first measurement at or after `tokens` training tokens, with the tokens it was taken at."""
    point = next((h for h in history if h["tokens"] >= tokens), None)
    if point is None:
        return "not run"
    return f"{point[key]:.4f}" + ("" if point["tokens"] == tokens else f" (@{point['tokens'] / 1e6:.3g}M)")


def to_target(history: list[dict], key: str) -> str:
    """Tokens until ppl_ratio ≤ PPL_TARGET (at measurement resolution), else the best reached; encoders: the best."""
    if key == "ppl_ratio":
        reached = next((h for h in history if h[key] <= PPL_TARGET), None)
        if reached is not None:
            return f"{reached['tokens']:,}"
        best = min(history, key=lambda h: h[key])
        return f"not reached; best {best[key]:.4f} @ {best['tokens']:,}"
    best = max(history, key=lambda h: h[key])
    return f"{best[key]:.4f} @ {best['tokens']:,}"


def report(runs: list[dict], machine: str) -> str:
    lines = [
        "# Healing: distilling converted MoE models back toward the dense ones",
        "",
        f"Updated {datetime.date.today()} on {machine} by `benchmarks/healing.py` (raw curves: healing.json). "
        "CPU only: no GPU was available, so 5M-token runs did not fit; every figure below was measured, "
        "and a milestone a run did not reach says `not run`.",
        "",
        "Setup: partition with each method's own router (random/kmeans: centroid, cmoe: cmoe; calibrated methods on "
        f"{CALIB_TOKENS} calibration tokens), `apply`, then `metanet heal` training routers+experts with configs/heal.yaml's "
        "loss weights and lr 1e-3 (constant after 20 warmup steps), batches of 8 windows × 128 tokens from the calibration "
        "split of the Shakespeare plays. Quality is measured on held-out plays every eval_every tokens; the milestone "
        "columns read that curve (`@` gives the tokens a measurement was actually taken at). The `metanet` method is left "
        "out: the metanetwork has no trained weights yet (`--methods ...,metanet` adds it).",
        "",
    ]
    for checkpoint in dict.fromkeys(r["checkpoint"] for r in runs):
        mine = [r for r in runs if r["checkpoint"] == checkpoint]
        key = "embedding_cosine" if mine[0]["family"] == "bert" else "ppl_ratio"
        lines += [f"## {checkpoint} ({key})", ""]
        target = f"tokens to ppl_ratio ≤ {PPL_TARGET}" if key == "ppl_ratio" else "best (@ tokens)"
        lines += [f"| point | method | before | 0.1M | 1M | 5M | end of run | {target} | trained tokens | heal seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(mine, key=lambda r: (list(POINTS).index(r["point"]), r["method"])):
            h = r["history"]
            lines.append(
                f"| {POINT_TITLES[r['point']]} | {r['method']}/{r['router']} | {h[0][key]:.4f} | "
                f"{' | '.join(milestone(h, key, m) for m in MILESTONES)} | {h[-1][key]:.4f} | {to_target(h, key)} | {r['tokens']:,} | {r['seconds']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="A zoo member folder or a bundled name (all-MiniLM-L6-v2).")
    parser.add_argument("--methods", default="random,kmeans,cmoe")
    parser.add_argument("--points", default=",".join(POINTS))
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--eval-every", type=int, default=25_000)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--report-only", action="store_true", help="Rebuild healing.md from healing.json without running anything.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import lightning.pytorch  # noqa: F401  (it sets its own log level on import; ours comes after)

    for noisy in ("lightning.pytorch", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp(prefix='heal-bench-mlflow-')}/mlflow.db")
    # lr 1e-3: what healing.md was measured at (the default then; HealSettings' default is 3e-4 since real-llm-heal.md)
    settings = HealSettings(tokens=args.tokens, eval_every=args.eval_every, eval_tokens=args.eval_tokens, lr=1e-3)
    store = RESULTS / "healing.json"
    runs = json.loads(store.read_text()) if store.exists() else []
    for point in [] if args.report_only else args.points.split(","):
        for method in args.methods.split(","):
            start = time.perf_counter()
            result = run(args.checkpoint, point, method, settings)
            logging.info("%s %s %s: %s in %.0f s", result["checkpoint"], point, method, result["history"][-1], time.perf_counter() - start)
            runs = [r for r in runs if (r["checkpoint"], r["point"], r["method"]) != (result["checkpoint"], point, method)] + [result]
            store.write_text(json.dumps(runs, indent=1))
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores (shared, nice'd), no GPU, Python {platform.python_version()}"
    (RESULTS / "healing.md").write_text(report(runs, machine))
    print((RESULTS / "healing.md").read_text())


if __name__ == "__main__":
    main()
