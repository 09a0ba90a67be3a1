"""Every partitioner × router on all-MiniLM-L6-v2 at both operating points of DESIGN.md, 3 seeds.

Writes benchmarks/results/baselines.md (and baselines.json beside it).
Run: .venv/bin/python benchmarks/baselines.py [--seeds 0,1,2] [--checkpoint all-MiniLM-L6-v2]
"""

import argparse
import datetime
import json
import logging
import os
import platform
import time
from pathlib import Path

from metanet.checkpoints import open_checkpoint
from metanet.eval.compare import CompareSettings, aggregate, compare, markdown_table
from metanet.partition import OperatingPoint
from metanet.partition.methods import METHODS
from metanet.partition.routers import DEFAULT_ROUTER, ROUTERS

POINTS = {"E=16, k=4, no shared experts": OperatingPoint(16, 4, 0), "E=16, 2 shared + 2 of 14 routed": OperatingPoint(16, 4, 2)}
COLUMNS = ("rel_error", "oracle_rel_error", "mass_recall", "router_recall", "load_cv", "embedding_cosine", "ppl_ratio", "convert_s", "calib_tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default="all-MiniLM-L6-v2")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    checkpoint = open_checkpoint(args.checkpoint)
    seeds = [int(s) for s in args.seeds.split(",")]
    sections, everything = [], {}
    start = time.perf_counter()
    for title, point in POINTS.items():
        settings = CompareSettings(methods=list(METHODS), point=point, routers=list(ROUTERS), seeds=seeds)
        rows = compare(checkpoint, settings, progress=logging.info)
        table = aggregate(rows)
        defaults = [row for row in table if DEFAULT_ROUTER[row["method"]] == row["router"]]
        best = min(table, key=lambda row: row["rel_error"])
        sections += [
            f"## {title}", "",
            "Each method with its own router:", "", markdown_table(defaults, COLUMNS),
            "Every partitioner × router pair (oracle_rel_error: the same partition under oracle routing):", "",
            markdown_table(table, COLUMNS),
            f"Lowest rel_error: {best['method']}/{best['router']} ({best['rel_error']:.4f}).", "",
        ]
        everything[title] = {"rows": [{k: v for k, v in r.items() if k != "layers"} for r in rows], "table": table}
    minutes = (time.perf_counter() - start) / 60
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, no GPU, Python {platform.python_version()}"
    header = [
        "# Baselines on all-MiniLM-L6-v2",
        "",
        f"Measured {datetime.date.today()} on {machine} in {minutes:.0f} min by `benchmarks/baselines.py` "
        f"(mean ± std over seeds {seeds}; the seed draws the calibration windows and the methods' randomness).",
        "Calibration: 4096 tokens from the calibration split of the Shakespeare corpus; every metric on 4096 held-out tokens "
        "of plays the calibration never saw. Metrics: DESIGN.md (layer means); embedding_cosine: mean-pooled sentence "
        "embeddings of the MoE vs the dense model. Data-free: random, kmeans, joint with centroid or scaled routers; "
        "everything else uses calibration text (calib_tokens).",
        "",
    ]
    out = Path(__file__).parent / "results"
    (out / "baselines.md").write_text("\n".join(header + sections))
    (out / "baselines.json").write_text(json.dumps(everything, indent=1))
    print((out / "baselines.md").read_text())


if __name__ == "__main__":
    main()
