"""The metanetwork against the baselines (issue "The metanetwork", quality bars), side by side.

On (1) all-MiniLM-L6-v2, which never enters training, and (2) members of the zoo's test split (the
held-out gpt_neox family, one member per test architecture), at E=16, k=4 and at 2 shared + 2 of
14 routed, 3 seeds: every method with the centroid, scaled, lsq and metanet routers, plus each
method's oracle routing (oracle_rel_error). Then the predict time of one random 4096×11008 gated
layer in a fresh process (wall time and peak RSS). Writes benchmarks/results/metanet.md and .json.

Run: .venv/bin/python benchmarks/metanetwork.py --zoo ZOO [--model FOLDER] [--seeds 0,1,2]
     .venv/bin/python benchmarks/metanetwork.py --only-predict-time [--device cuda]    (re-measures that figure alone, in place)
Time it on an otherwise idle machine: on 2 cores a concurrent job inflates the predict time by half.
"""

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ["random", "kmeans", "joint", "coact", "cmoe", "metanet", "metanet-data"]
ROUTERS = ["centroid", "scaled", "lsq", "metanet"]
DATA_FREE = {("kmeans", "centroid"), ("kmeans", "scaled"), ("joint", "centroid"), ("joint", "scaled")}
DATA_DRIVEN = {(m, r) for m in ("coact", "cmoe") for r in ROUTERS}
PREDICT_REPEATS = 5
RESULTS = Path(__file__).parent / "results"
COLUMNS = ("rel_error", "oracle_rel_error", "router_recall", "load_cv", "embedding_cosine", "ppl_ratio", "convert_s", "calib_tokens")


def points():
    from metanet.partition import OperatingPoint

    return {"E=16, k=4, no shared experts": OperatingPoint(16, 4, 0), "E=16, 2 shared + 2 of 14 routed": OperatingPoint(16, 4, 2)}


def zoo_test_members(zoo: str | Path) -> list[dict]:
    """Manifest rows of the zoo's test members with seed 0 at their last checkpoint, one per architecture, in
    architecture order (what metanet.md measures as "the zoo test split")."""
    from training.zoo import read_manifest

    rows = [row for row in read_manifest(zoo) if row["split"] == "test" and row["seed"] == 0]
    if not rows:
        raise SystemExit(f"no seed-0 test members in {zoo}: build them with `metanet zoo build --config configs/zoo.yaml "
                         f"--out {zoo} --seeds 0 --splits test`")
    last = max(row["steps"] for row in rows)
    return sorted((row for row in rows if row["steps"] == last), key=lambda row: row["architecture"])


def run_compare(checkpoint_spec: str, point, seeds: list[int], net, model_quality: bool) -> list[dict]:
    from metanet.checkpoints import open_checkpoint
    from metanet.eval.compare import CompareSettings, compare

    settings = CompareSettings(methods=METHODS, point=point, routers=ROUTERS, seeds=seeds, model_quality=model_quality, metanetwork=net)
    return compare(open_checkpoint(checkpoint_spec), settings, progress=logging.info)


def mean_over(rows: list[dict], keys: tuple[str, ...], columns: tuple[str, ...] | None = None) -> list[dict]:
    """Rows grouped by their values of `keys` (first-seen order), each group as one row: those values, `members` (the
    group's size) and the mean of every column of `columns` — None: every float column — its first row holds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in keys), []).append(row)
    means = []
    for values, group in groups.items():
        kept = [c for c in group[0] if isinstance(group[0][c], float)] if columns is None else [c for c in columns if group[0].get(c) is not None]
        means.append({**dict(zip(keys, values)), "members": len(group), **{c: statistics.fmean(row[c] for row in group) for c in kept}})
    return means


def bars(table: list[dict]) -> list[str]:
    """The issue's bars on one table (mean over seeds), as Markdown lines with the measured margins."""
    by = {(row["method"], row["router"]): row for row in table}
    free = min((by[p] for p in DATA_FREE), key=lambda row: row["rel_error"])
    driven = min((by[p] for p in DATA_DRIVEN), key=lambda row: row["rel_error"])
    ours = by[("metanet", "metanet")]
    aware = min((by[("metanet-data", r)] for r in ("metanet", "lsq")), key=lambda row: row["rel_error"])

    def verdict(value: float, limit: float) -> str:
        return f"{'met' if value <= limit else 'missed'} ({value:.4f} vs ≤ {limit:.4f}, {100 * (value / limit - 1):+.1f}%)"

    return [
        f"- best data-free baseline: {free['method']}/{free['router']} {free['rel_error']:.4f}; best data-driven baseline: "
        f"{driven['method']}/{driven['router']} {driven['rel_error']:.4f}",
        f"- data-free metanet ≥ 10% below the best data-free baseline: {verdict(ours['rel_error'], 0.9 * free['rel_error'])}",
        f"- data-free metanet at or below the best data-driven baseline: {verdict(ours['rel_error'], driven['rel_error'])}",
        f"- data-free metanet within 5% of oracle routing on its own partition (aim): {verdict(ours['rel_error'], 1.05 * ours['oracle_rel_error'])}",
        f"- data-aware metanet ({aware['method']}/{aware['router']}) ≥ 10% below the best data-driven baseline: "
        f"{verdict(aware['rel_error'], 0.9 * driven['rel_error'])}",
        f"- metanet router within 10% of oracle routing on its own partition: {verdict(ours['rel_error'], 1.1 * ours['oracle_rel_error'])}",
        "",
    ]


def predict_time(model: str | None, device: str = "cpu") -> dict:
    """Time MetaNetwork.predict on one random gated 4096×11008 layer (E=16, k=4); run in a fresh process for the peak RSS.
    On a GPU (device "cuda") the layer and the network live there; one untimed call first pays the CUDA start-up,
    and the timed call ends with a synchronisation (its result is on the GPU until then)."""
    import torch

    from metanet.checkpoints.ffn_layer import FFNLayer, Norm
    from metanet.model.store import load_model
    from metanet.partition import OperatingPoint

    torch.manual_seed(0)
    d, f = 4096, 11008
    layer = FFNLayer(w_in=torch.randn(f, d) / d**0.5, w_gate=torch.randn(f, d) / d**0.5, w_out=torch.randn(d, f) / f**0.5,
                     activation="silu", norm=Norm("rmsnorm", torch.ones(d), None, 1e-6)).to(device=device)
    net = load_model(model).to(device)
    point = OperatingPoint(16, 4)
    if device == "cuda":
        net.predict(layer, point)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    net.predict(layer, point)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    timing = {"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "weights_rss_gb": rss_before, "threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        timing |= {"gpu": torch.cuda.get_device_name(), "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    return timing


def measure_predict_time(model: str | None, device: str = "cpu") -> dict:
    """predict_time in PREDICT_REPEATS fresh processes, one after the other: the median run, with the range of the times."""
    command = [sys.executable, __file__, "--predict-time", "--device", device, *(["--model", model] if model else [])]
    runs = [json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout) for _ in range(PREDICT_REPEATS)]
    median = sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]
    timing = median | {"date": str(datetime.date.today()), "runs": len(runs), "min_s": min(r["seconds"] for r in runs), "max_s": max(r["seconds"] for r in runs)}
    logging.info("predict time: %s", timing)
    return timing


def predict_time_line(cpu: dict, gpu: dict | None) -> str:
    """The predict-time paragraph of metanet.md: the CPU figure, and the GPU one where it was measured."""
    line = (f"Predict time of one random 4096×11008 gated layer (E=16, k=4), median of {cpu['runs']} fresh processes on an otherwise "
            f"idle machine ({cpu['date']}), {cpu['threads']} threads: **{cpu['seconds']:.1f} s** (range {cpu['min_s']:.1f}–{cpu['max_s']:.1f} s), "
            f"peak RSS **{cpu['peak_rss_gb']:.2f} GB** (of which {cpu['weights_rss_gb']:.2f} GB before the call: the layer's weights "
            "and the model).")
    if gpu is None:
        return line + " GPU: not measured, no GPU was lent to this session."
    return line + (f" On an {gpu['gpu']} ({gpu['date']}, median of {gpu['runs']} fresh processes, after one untimed call): "
                   f"**{gpu['seconds']:.2f} s** (range {gpu['min_s']:.2f}–{gpu['max_s']:.2f} s), peak GPU memory {gpu['peak_gpu_memory_gb']:.2f} GB.")


def update_predict_time(timing: dict) -> None:
    """Put a new predict time (CPU or GPU, by timing["device"]) into metanet.json and its paragraph of metanet.md,
    leaving the tables and the other device's figure as measured."""
    figures = json.loads((RESULTS / "metanet.json").read_text())
    figures["predict_time_gpu" if timing["device"] == "cuda" else "predict_time"] = timing
    (RESULTS / "metanet.json").write_text(json.dumps(figures, indent=1))
    page = RESULTS / "metanet.md"
    paragraph = predict_time_line(figures["predict_time"], figures.get("predict_time_gpu"))
    lines = [paragraph if line.startswith("Predict time of one random") else line for line in page.read_text().split("\n")]
    page.write_text("\n".join(lines))
    logging.info("updated the predict time in %s", page)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zoo", required=False, help="Zoo folder (its test split is measured); omit to measure MiniLM only.")
    parser.add_argument("--model", default=None, help="Metanetwork folder (default: the shipped one).")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--predict-time", action="store_true", help=argparse.SUPPRESS)  # the child process of predict_time
    parser.add_argument("--only-predict-time", action="store_true", help="Re-measure the predict time alone and update metanet.md/.json.")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="Where the predict time is measured (default: cpu).")
    args = parser.parse_args()
    if args.predict_time:
        print(json.dumps(predict_time(args.model, args.device)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device != "cpu" and not args.only_predict_time:
        raise SystemExit("--device cuda measures the predict time alone: add --only-predict-time")
    timing = measure_predict_time(args.model, args.device)
    if args.only_predict_time:  # needs neither mlflow nor lightning (a GPU machine may have neither)
        update_predict_time(timing)
        return
    from metanet.eval.compare import aggregate, markdown_table
    from metanet.model.store import load_model, model_facts
    net = load_model(args.model)
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    sections, everything = [], {}
    targets = {"all-MiniLM-L6-v2 (never in training)": ["all-MiniLM-L6-v2"]}
    if args.zoo:
        test = zoo_test_members(args.zoo)
        targets[f"zoo test split: {len(test)} held-out-family members ({', '.join(sorted({r['family'] for r in test}))}), mean over members"] = [
            str(Path(args.zoo) / row["path"]) for row in test]
    for target, checkpoints in targets.items():
        sections += [f"## {target}", ""]
        for title, point in points().items():
            per_member = [run_compare(c, point, seeds, net, model_quality=len(checkpoints) == 1) for c in checkpoints]
            rows = per_member[0] if len(per_member) == 1 else mean_over([row for rows in per_member for row in rows], ("method", "router", "seed"), COLUMNS)
            table = aggregate(rows)
            sections += [f"### {title}", "", markdown_table(table, COLUMNS), *bars(table)]
            everything[f"{target} / {title}"] = table
    minutes = (time.perf_counter() - start) / 60
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, no GPU, Python {platform.python_version()}"
    facts = model_facts(args.model)
    recorded = RESULTS / "metanet.json"
    gpu_timing = json.loads(recorded.read_text()).get("predict_time_gpu") if recorded.is_file() else None  # measured on a GPU machine: kept
    header = [
        "# The metanetwork against the baselines",
        "",
        f"Measured {datetime.date.today()} on {machine} in {minutes:.0f} min by `benchmarks/metanetwork.py` (mean ± std over seeds {seeds}; "
        "the seed draws the calibration windows and the baselines' randomness — the metanetwork itself is deterministic).",
        f"Model: {'the shipped model' if args.model is None else args.model}, config {json.dumps(facts['config'])}, trained "
        f"{facts['training'].get('steps', '?')} steps on {facts['training'].get('zoo', '?')} with configs/train.yaml.",
        "Methods: `metanet` is data-free (weights only, router fitted on the network's synthetic inputs); `metanet-data` adds "
        "calibration neuron statistics as node features. Calibration: 4096 tokens; all metrics on 4096 held-out tokens. "
        "Routers: centroid, scaled (data-free), lsq (calibration), metanet (data-free, any partition); oracle_rel_error is "
        "the same partition under oracle routing. The mlp and cmoe routers lost to lsq for every partition in baselines.md and are left out.",
        "What the network's learned parts add over the same architecture at initialisation and over its hand-built parts alone, "
        "in whole-model quality on SmolLM2-135M, all-MiniLM-L6-v2 and the zoo's test split: metanet-ablation.md (benchmarks/metanet_ablation.py).",
        "",
        predict_time_line(timing, gpu_timing),
        "",
    ]
    out = RESULTS
    (out / "metanet.md").write_text("\n".join(header + sections))
    (out / "metanet.json").write_text(json.dumps({"tables": everything, "predict_time": timing,
                                                  **({"predict_time_gpu": gpu_timing} if gpu_timing else {})}, indent=1))
    print((out / "metanet.md").read_text())


if __name__ == "__main__":
    main()
