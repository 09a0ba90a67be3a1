"""What the metanetwork's learned parts add: the shipped network against the same architecture at
initialisation and against its hand-built parts alone (issue "The metanetwork earns its place", item 1).

Every variant has the shipped config (metanet.model.network's docstring names the parts):

    shipped          the trained network
    init             the same architecture freshly initialised (torch seed 0): importance is the weight-norm
                     proxy, the clustering space ≈ the kmeans baseline's (π₁ ≈ 0.96 on the input rows, a random
                     embedding at π₃ ≈ 0.02), the router fitted on inputs at the norm's own scale (σ = μ = 0)
    no-embedding     shipped without its learned embedding ẑ (π₃ = 0, π₁ : π₂ as trained)
    no-input-model   shipped with σ = μ = 0: its router fitted on inputs at the norm's own scale and offset
    hand-built       shipped with all three learned heads off (no embedding, no input model, no importance
                     correction): the hand-made clustering features mixed by the trained π, and nothing else

Each row is data-free, as `metanet partition --method metanet` writes it: the variant's partition and its own
router, no calibration text, no conversion technique. Targets: SmolLM2-135M-Instruct at k = 4, 8, 12 of 16
(ppl_ratio on held-out Shakespeare and mlflow-docs), all-MiniLM-L6-v2 at k = 4 and 8 (embedding cosine), and the
zoo's test split (the held-out gpt_neox family, seed-0 members at their last checkpoint, as metanet.md measures
it; ppl_ratio and rel_error averaged over the members) at k = 4 and 8. rel_error is the mean per-layer FFN
output error on held-out Shakespeare (a diagnostic). Writes benchmarks/results/metanet-ablation.md and .json.

--pipeline adds what users get from a data-free partition: SmolLM2 at k = 8 of 16 through the library's default
conversion pipeline (mix calibration, 16k tokens; sequential fitting, coverage refinement, compensation; the lsq
router), for `init` and `hand-built`; the shipped network's row is benchmarks/real_llm.py's metanet/lsq/full row
(real-llm.json), measured by the same pipeline on the same held-out windows.

Run (CPU; the zoo's test members first, if the zoo is not built):
    metanet zoo build --config configs/zoo.yaml --out benchmarks/.work/zoo --seeds 0 --splits test
    .venv/bin/python -m benchmarks.metanet_ablation --zoo benchmarks/.work/zoo
    .venv/bin/python -m benchmarks.metanet_ablation --pipeline      # adds the pipeline rows (~15 min each)
    .venv/bin/python -m benchmarks.metanet_ablation --report        # rebuild the markdown only
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning OpenMP threads stall on shared cores

import torch  # noqa: E402

from benchmarks.metanetwork import mean_over, zoo_test_members
from benchmarks.real_llm import DOMAINS, MINILM, SMOLLM2, Bench, key as row_key, row as conversion_row  # noqa: E402
from metanet.conversion.pipeline import ConversionSettings, convert_checkpoint  # noqa: E402
from metanet.model import MetaNetwork  # noqa: E402
from metanet.model.predict import predict_partition  # noqa: E402
from metanet.model.store import load_model  # noqa: E402
from metanet.partition import OperatingPoint  # noqa: E402

EXPERTS = 16
VARIANTS = ("shipped", "init", "no-embedding", "no-input-model", "hand-built")
TARGETS = {SMOLLM2: (4, 8, 12), MINILM: (4, 8), "zoo test split": (4, 8)}
HELDOUT_TOKENS = 4096
RESULTS = Path(__file__).parent / "results"

log = logging.getLogger("metanet_ablation")


def variant(shipped: MetaNetwork, name: str) -> MetaNetwork:
    """The network of variant `name` (module docstring), built from the shipped one."""
    if name == "shipped":
        return shipped
    if name == "init":
        torch.manual_seed(0)
        return MetaNetwork(shipped.config).eval()
    net = copy.deepcopy(shipped)
    with torch.no_grad():
        if name in ("no-embedding", "hand-built"):
            net.mix[2] = -float("inf")  # π₃ = softmax(mix)₃ = 0
        if name in ("no-input-model", "hand-built"):
            net.input_head[-1].weight.zero_()  # σ = μ = 0
            net.input_head[-1].bias.zero_()
        if name == "hand-built":
            net.importance_head[-1].weight.zero_()  # importance = the weight-norm proxy
            net.importance_head[-1].bias.zero_()
    return net


def timed_quality(bench: Bench, make_partition: Callable[[], object]) -> tuple[float, dict]:
    """(seconds `make_partition()` took, bench.quality of its partition without the per-layer list)."""
    start = time.perf_counter()
    partition = make_partition()
    seconds = round(time.perf_counter() - start, 1)
    quality = bench.quality(partition)
    quality.pop("rel_error_by_layer")
    return seconds, quality


def measure_checkpoint(name: str, actives: tuple[int, ...], nets: dict[str, MetaNetwork]) -> list[dict]:
    """One row per (variant, k) on checkpoint `name` (a bundled name or a folder)."""
    bench = Bench(name, 0, HELDOUT_TOKENS)
    rows = []
    for k in actives:
        for label, net in nets.items():
            seconds, quality = timed_quality(bench, lambda: predict_partition(bench.checkpoint, OperatingPoint(EXPERTS, k), net=net))
            rows.append({"checkpoint": str(name), "variant": label, "experts": EXPERTS, "active": k, "predict_s": seconds, **quality})
            log.info("%s k=%d %s: %s", name, k, label, {key: round(v, 4) for key, v in quality.items()})
    return rows


def pipeline_rows(nets: dict[str, MetaNetwork]) -> list[dict]:
    """SmolLM2 at k = 8 through the default conversion pipeline from each variant's partition (module docstring)."""
    settings = ConversionSettings(method="metanet", router="lsq", point=OperatingPoint(EXPERTS, 8))
    bench = Bench(SMOLLM2, settings.calib_tokens, HELDOUT_TOKENS)
    rows = []
    for name in ("init", "hand-built"):
        seconds, quality = timed_quality(bench, lambda: convert_checkpoint(bench.checkpoint, settings, bench.model, bench.tokenizer,
                                                                           bench.corpus, metanetwork=nets[name]))
        rows.append({"variant": name, "active": 8, "source": "measured here", "convert_s": seconds, **quality})
        log.info("pipeline k=8 %s: %s", name, {k: round(v, 4) for k, v in quality.items()})
    shipped = json.loads((RESULTS / "real-llm.json").read_text())["rows"].get(row_key(conversion_row(SMOLLM2, "metanet", "lsq", "full", 8)))
    if shipped is None:
        log.warning("no metanet/lsq/full row at k=8 in real-llm.json (`python -m benchmarks.real_llm --rows methods`): the shipped row is left out")
        return rows
    return [{"variant": "shipped", "active": 8, "source": "real-llm.json", "convert_s": shipped["convert_s"],
             **{k: shipped[k] for k in (*(f"ppl_ratio.{d}" for d in DOMAINS), "rel_error", "oracle_rel_error")}}, *rows]


# -- report -----------------------------------------------------------------------------------------
def quality_columns(rows: list[dict]) -> list[str]:
    return [f"{metric}.{domain}" for metric in ("ppl_ratio", "embedding_cosine") for domain in DOMAINS if f"{metric}.{domain}" in rows[0]]


def number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def versus(shipped: float, other: float, higher_is_better: bool) -> str:
    """The shipped network's change against `other`, signed so that negative is better for ppl_ratio and rel_error."""
    return f"{100 * (shipped / other - 1):+.1f}%" if not higher_is_better else f"{100 * (shipped - other):+.1f} pts"


def bars(results: dict) -> list[str]:
    """Issue 19's first bar, as measured lines: the shipped network ≥ 10% better than the same architecture at
    initialisation in SmolLM2 ppl_ratio at 50% active and in rel_error on the zoo test split (k = 4, metanet.md's point)."""
    def pair(rows: list[dict], k: int, column: str) -> str:
        by = {r["variant"]: r for r in rows if r["active"] == k}
        if "shipped" not in by or "init" not in by:
            return "not measured"
        change = by["shipped"][column] / by["init"][column] - 1
        return f"{'met' if change <= -0.10 else 'missed'} (shipped {number(by['shipped'][column])} against init {number(by['init'][column])}: {100 * change:+.1f}%)"

    targets = results["targets"]
    lines = ["Issue 19's first bar, the shipped network at least 10% better than the same architecture at initialisation:", "",
             f"- SmolLM2 ppl_ratio on Shakespeare at 50% active, data-free: {pair(targets[SMOLLM2], 8, 'ppl_ratio.shakespeare')}"]
    if results.get("pipeline"):
        lines.append(f"- the same through the conversion pipeline (below): {pair(results['pipeline'], 8, 'ppl_ratio.shakespeare')}")
    if "zoo test split" in targets:
        lines.append(f"- rel_error on the zoo test split at k = 4: {pair(targets['zoo test split'], 4, 'rel_error')}")
    return [*lines, ""]


def report(results: dict) -> str:
    lines = [
        "# What the metanetwork's learned parts add",
        "",
        f"Measured {results['date']} on {results['machine']} in {results['minutes']:.0f} min by `benchmarks/metanet_ablation.py` "
        "(raw rows: metanet-ablation.json). The shipped network (metanet/model/shipped: config "
        f"{json.dumps(results['config'])}, trained {results['training_steps']} steps on the zoo) against the same architecture "
        "at initialisation (`init`, torch seed 0) and against itself with learned parts switched off: `no-embedding` (the "
        "learned clustering embedding ẑ weighted 0, π₁ : π₂ as trained), `no-input-model` (σ = μ = 0: the router fitted on "
        "synthetic inputs at the norm's own scale and offset), `hand-built` (both, and the importance correction, off: "
        "the hand-made clustering features and router alone). Every row is data-free and as `metanet partition --method "
        f"metanet` writes it: the variant's partition and its own router, no calibration text, no conversion technique; E = {EXPERTS}. "
        f"ppl_ratio: perplexity of the MoE model / the dense model on {HELDOUT_TOKENS} held-out tokens of Shakespeare and of "
        "mlflow-docs (Markdown guides of the mlflow package); embedding_cosine for the encoder MiniLM; rel_error: mean "
        "per-layer FFN output error on held-out Shakespeare (a diagnostic). The zoo test split is the held-out gpt_neox "
        "family (seed-0 members at their last checkpoint, built by `metanet zoo build --config configs/zoo.yaml --seeds 0 "
        "--splits test`; the metric columns are means over the members). Lower is better "
        "but for embedding_cosine. Bold: the best variant of its block. *shipped vs this*: the shipped network's figure "
        "against the row's, in % for ppl_ratio and rel_error (negative: the shipped network is better) and in points of "
        "cosine (positive: the shipped network is better).",
        "",
        *bars(results),
    ]
    for target, rows in results["targets"].items():
        members = rows[0].get("members")
        lines += [f"## {target}" + (f" ({members} members)" if members else ""), ""]
        columns = quality_columns(rows) + ["rel_error", "oracle_rel_error"]
        lines += ["| active | variant | " + " | ".join(columns) + " | shipped vs this |", "|---" * (len(columns) + 3) + "|"]
        for k in sorted({r["active"] for r in rows}):
            block = {r["variant"]: r for r in rows if r["active"] == k}
            head = columns[0]
            higher = head.startswith("embedding")
            best = {c: (max if c.startswith("embedding") else min)(r[c] for r in block.values()) for c in columns}
            for name in VARIANTS:
                r = block[name]
                cells = [f"**{number(r[c])}**" if r[c] == best[c] else number(r[c]) for c in columns]
                change = "—" if name == "shipped" else f"{head.split('.')[0]} {versus(block['shipped'][head], r[head], higher)}, rel_error {versus(block['shipped']['rel_error'], r['rel_error'], False)}"
                lines.append(f"| {k} of {EXPERTS} ({k / EXPERTS:.0%}) | {name} | " + " | ".join(cells) + f" | {change} |")
        lines.append("")
    if results.get("pipeline"):
        rows = {r["variant"]: r for r in results["pipeline"]}
        columns = [f"ppl_ratio.{d}" for d in DOMAINS] + ["rel_error", "oracle_rel_error"]
        lines += [f"## {SMOLLM2} through the conversion pipeline", "",
                  "The variant's data-free partition as the start of the library's default pipeline (mix calibration of 16k tokens, "
                  "sequential fitting, coverage refinement, compensation, the lsq router), k = 8 of 16: what a user converting "
                  "with `metanet convert --method metanet` gets. The shipped row is real-llm.json's metanet/lsq/full row.", "",
                  "| variant | " + " | ".join(columns) + " | convert_s | shipped vs this |", "|---" * (len(columns) + 3) + "|"]
        for name, r in rows.items():
            change = "—" if name == "shipped" or "shipped" not in rows else f"ppl_ratio {versus(rows['shipped'][columns[0]], r[columns[0]], False)}, rel_error {versus(rows['shipped']['rel_error'], r['rel_error'], False)}"
            lines.append(f"| {name} | " + " | ".join(number(r[c]) for c in columns) + f" | {r['convert_s']:.0f} | {change} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, help="Zoo folder with the test split built (default: leave the zoo rows out).")
    parser.add_argument("--pipeline", action="store_true", help="Add the rows through the conversion pipeline to the JSON (module docstring).")
    parser.add_argument("--report", action="store_true", help="Rebuild metanet-ablation.md from the JSON; measure nothing.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    store = RESULTS / "metanet-ablation.json"
    if args.pipeline:
        results = json.loads(store.read_text())
        shipped = load_model(None)
        results["pipeline"] = pipeline_rows({name: variant(shipped, name) for name in ("init", "hand-built")})
        store.write_text(json.dumps(results, indent=1))
    elif not args.report:
        from metanet.model.store import model_facts

        start = time.perf_counter()
        shipped = load_model(None)
        nets = {name: variant(shipped, name) for name in VARIANTS}
        targets = {name: measure_checkpoint(name, TARGETS[name], nets) for name in (SMOLLM2, MINILM)}
        if args.zoo:
            members = [row for member in zoo_test_members(args.zoo) for row in measure_checkpoint(args.zoo / member["path"], TARGETS["zoo test split"], nets)]
            targets["zoo test split"] = [{"checkpoint": "zoo test split", "experts": EXPERTS, **row}
                                          for row in mean_over(members, ("variant", "active"))]
            targets["zoo test split, per member"] = members
        facts = model_facts(None)
        store.write_text(json.dumps({
            "date": str(datetime.date.today()), "minutes": (time.perf_counter() - start) / 60,
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, no GPU, torch {torch.__version__}",
            "config": facts["config"], "training_steps": facts["training"].get("steps"),
            "targets": {name: rows for name, rows in targets.items() if not name.endswith("per member")},
            "zoo_members": targets.get("zoo test split, per member", []),
            **({"pipeline": json.loads(store.read_text()).get("pipeline")} if store.is_file() else {}),  # measured by --pipeline: kept
        }, indent=1))
    (RESULTS / "metanet-ablation.md").write_text(report(json.loads(store.read_text())))
    log.info("wrote %s", RESULTS / "metanet-ablation.md")


if __name__ == "__main__":
    main()
