"""Build a zoo from scratch with the `metanet zoo build` command and report it in benchmarks/results/zoo.md.

Run: .venv/bin/python benchmarks/zoo_build.py [--config configs/zoo.yaml] [--out zoo] [--workers 2]
The output folder must not hold a zoo yet (the wall time is that of a whole build). Reported:
machine, wall time, member count, held-out loss per family against the unigram baseline (the
entropy of the held-out tokens, which no unigram model beats), splits, teacher rel_error.
"""

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from training.zoo import loss_summary, read_manifest

RESULTS = Path(__file__).parent / "results" / "zoo.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/zoo.yaml")
    parser.add_argument("--out", default="zoo")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if Path(args.out, "zoo.json").exists():
        sys.exit(f"{args.out} already holds a zoo; the benchmark times a whole build, give a new --out")
    exe = shutil.which("metanet", path=str(Path(sys.executable).parent)) or "metanet"
    command = [exe, "zoo", "build", "--config", args.config, "--out", args.out, "--workers", str(args.workers)]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    minutes = (time.perf_counter() - start) / 60
    rows = read_manifest(args.out)
    RESULTS.write_text(report(rows, args, minutes))
    print(f"written: {RESULTS}")


def report(rows: list[dict], args, minutes: float) -> str:
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, no GPU, Python {platform.python_version()}"
    gaps = [r["unigram_loss"] - r["heldout_loss"] for r in rows]
    lines = [
        "# Model zoo",
        "",
        f"Built {datetime.date.today()} on {machine} by `metanet zoo build --config {args.config} --workers {args.workers}` "
        f"(`benchmarks/zoo_build.py`): **{len(rows)} members in {minutes:.1f} min** of wall time, from an empty folder.",
        "",
        "Held-out loss: mean next-token cross-entropy (nats) on the zoo's held-out windows (plays no member trained on). "
        "Unigram baseline: the entropy of those very tokens, the lowest loss any unigram model can reach on them.",
        "",
        "| family | members | held-out loss min | median | max | unigram baseline |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in loss_summary(rows):
        lines.append(f"| {s['family']} | {s['members']} | {s['heldout_min']:.3f} | {s['heldout_median']:.3f} | {s['heldout_max']:.3f} | {s['unigram']:.3f} |")
    lines += [
        "",
        f"Held-out loss minus unigram baseline: {-max(gaps):+.2f} to {-min(gaps):+.2f} nats; "
        f"{sum(g > 0 for g in gaps)} of {len(rows)} members are below the baseline.",
        "",
        "| checkpoint step | members | held-out loss median | train loss median |",
        "|---:|---:|---:|---:|",
    ]
    for steps in sorted({r["steps"] for r in rows}):
        group = [r for r in rows if r["steps"] == steps]
        heldout, train = statistics.median(r["heldout_loss"] for r in group), statistics.median(r["train_loss"] for r in group)
        lines.append(f"| {steps} | {len(group)} | {heldout:.3f} | {train:.3f} |")
    lines += [
        "",
        "Splits: " + ", ".join(f"{split} {sum(r['split'] == split for r in rows)}" for split in ("train", "val", "test")) + ".",
        "",
        "Teacher partitions, held-out rel_error over members:",
        "",
        "| teacher | mean | min | max |",
        "|---|---:|---:|---:|",
    ]
    for name in rows[0]["teachers"]:
        values = [r["teachers"][name] for r in rows]
        lines.append(f"| {name} | {statistics.mean(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    lines += [
        "",
        "Architectures (held-out loss at the last checkpoint, mean over seeds):",
        "",
        "| architecture | family | d_model | d_ff | layers | lr | weight decay | split of seed 0 | held-out loss |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    last = max(r["steps"] for r in rows)
    for architecture in sorted({r["architecture"] for r in rows}):
        group = [r for r in rows if r["architecture"] == architecture and r["steps"] == last]
        r = group[0]
        lines.append(f"| a{architecture:02d} | {r['family']} | {r['d_model']} | {r['d_ff']} | {r['n_layers']} | {r['lr']} | "
                     f"{r['weight_decay']} | {r['split']} | {statistics.mean(g['heldout_loss'] for g in group):.3f} |")
    seconds = [r["seconds"] for r in rows]
    lines += [
        "",
        f"Per-member build time (training since the previous checkpoint, then the caches), one torch thread per worker: "
        f"median {statistics.median(seconds):.0f} s, max {max(seconds):.0f} s.",
        "",
        "How much the members' FFNs look like real LLMs' (output-mass concentration, massive input coordinates, 25%-active "
        "quality next to SmolLM2-135M and all-MiniLM-L6-v2): zoo-realism.md (benchmarks/zoo_realism.py).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
