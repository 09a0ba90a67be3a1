"""Calibration on windows the model writes itself against calibration on real text, and against no calibration.

For each checkpoint — all-MiniLM-L6-v2 (an encoder: its windows are uniform token ids) and one
trained member per family of the tiny zoo (gpt2, opt, llama: causal LMs that sample their own
windows) — rel_error on held-out Shakespeare of:
  data-free      metanet with its own router; kmeans and joint with the centroid and scaled routers
  generated      metanet, metanet-data, kmeans, joint, coact, cmoe with the lsq router, calibration
                 (statistics and router fit) on 4096 tokens the model wrote (`--calibration generated`)
  text           the same on 4096 tokens of the corpus's calibration half
E=16, k=4 (E=8, k=2 where d_ff=128), seed 0. Writes benchmarks/results/generated-calibration.md and .json.

Run (CPU, ~10 min; builds the tiny zoo into a temporary folder unless --zoo names one):
    .venv/bin/python -m benchmarks.generated_calibration [--zoo FOLDER]
"""

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from metanet.checkpoints import open_checkpoint
from metanet.eval.compare import CompareSettings, compare
from metanet.partition import OperatingPoint

RESULTS = Path(__file__).parent / "results"
ZOO_MEMBERS = ("a00-gpt2-d64-f256-L2-seed0-step90", "a01-opt-d64-f128-L2-seed0-step90", "a02-llama-d64-f256-L2-seed0-step90")
CALIBRATED = ["metanet", "metanet-data", "kmeans", "joint", "coact", "cmoe"]
#: (label, compare settings beyond the checkpoint's operating point)
RUNS = (
    ("data-free", {"methods": ["metanet"], "routers": None}),
    ("data-free", {"methods": ["kmeans", "joint"], "routers": ["centroid", "scaled"]}),
    ("generated", {"methods": CALIBRATED, "routers": ["lsq"], "calibration": "generated"}),
    ("text", {"methods": CALIBRATED, "routers": ["lsq"], "calibration": "text"}),
)


def point_for(d_ff: int) -> OperatingPoint:
    return OperatingPoint(16, 4) if d_ff >= 256 else OperatingPoint(8, 2)


def measure(checkpoint_path: str) -> list[dict]:
    checkpoint = open_checkpoint(checkpoint_path)
    point = point_for(checkpoint.d_ff)
    rows = []
    for label, settings in RUNS:
        for row in compare(checkpoint, CompareSettings(point=point, model_quality=False, **settings)):
            rows.append({"checkpoint": Path(checkpoint_path).name, "family": checkpoint.family.name, "experts": point.experts,
                         "active": point.active, "calibration": label, "method": row["method"], "router": row["router"],
                         "rel_error": row["rel_error"], "oracle_rel_error": row["oracle_rel_error"], "calib_tokens": row.get("calib_tokens", 0)})
            logging.info("%s %s %s/%s: %.4f", rows[-1]["checkpoint"], label, row["method"], row["router"], row["rel_error"])
    return rows


def report(rows: list[dict], minutes: float) -> str:
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    keys = list(dict.fromkeys((r["calibration"], r["method"], r["router"]) for r in rows))
    value = {(r["checkpoint"], r["calibration"], r["method"], r["router"]): r["rel_error"] for r in rows}
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, no GPU"
    lines = [
        "# Calibration the model writes itself",
        "",
        f"Measured {datetime.date.today()} on {machine} in {minutes:.0f} min by `benchmarks/generated_calibration.py`, seed 0. "
        "rel_error of the FFN outputs on 4096 held-out Shakespeare tokens (lower is better). *generated*: partition statistics and "
        "the lsq router fitted on 4096 tokens the model wrote itself (causal LMs sample from themselves from a random first token; "
        "the encoder MiniLM gets uniform token ids) — no text at all; *text*: the same on 4096 tokens of real calibration text; "
        "*data-free*: no calibration. Tiny-zoo members are small trained LMs of `configs/zoo-tiny.yaml` (90 steps); "
        + ", ".join(f"{c}: E={p['experts']}, k={p['active']}" for c, p in
                    {r["checkpoint"]: r for r in rows}.items()) + ".",
        "",
        "| calibration | method/router | " + " | ".join(checkpoints) + " |",
        "|---|---|" + "---|" * len(checkpoints),
    ]
    for calibration, method, router in keys:
        cells = []
        for checkpoint in checkpoints:
            here = [v for (c, cal, _, _), v in value.items() if c == checkpoint and cal == calibration]
            v = value.get((checkpoint, calibration, method, router))
            cells.append("–" if v is None else f"**{v:.4f}**" if v == min(here) else f"{v:.4f}")
        lines.append(f"| {calibration} | {method}/{router} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: the best of its calibration block for that checkpoint.", "",
              "Best of each block (method/router in brackets):", "",
              "| checkpoint | data-free | generated | text |", "|---|---|---|---|"]
    for checkpoint in checkpoints:
        best = {}
        for calibration in ("data-free", "generated", "text"):
            block = {(m, r): v for (c, cal, m, r), v in value.items() if c == checkpoint and cal == calibration}
            (method, router), v = min(block.items(), key=lambda item: item[1])
            best[calibration] = f"{v:.4f} ({method}/{router})"
        lines.append(f"| {checkpoint} | {best['data-free']} | {best['generated']} | {best['text']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, help="A tiny zoo folder (metanet zoo build --config configs/zoo-tiny.yaml); default: built here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tiny-zoo-") as tmp:
        zoo = args.zoo
        if zoo is None:
            zoo = Path(tmp) / "zoo"
            config = Path(__file__).parents[1] / "configs" / "zoo-tiny.yaml"
            metanet = Path(sys.executable).parent / "metanet"  # the console script installed beside this interpreter
            subprocess.run([str(metanet), "zoo", "build", "--config", str(config), "--out", str(zoo)], check=True)
        rows = []
        for checkpoint in ["all-MiniLM-L6-v2", *(str(zoo / "members" / name) for name in ZOO_MEMBERS)]:
            rows += measure(checkpoint)
    minutes = (time.perf_counter() - start) / 60
    (RESULTS / "generated-calibration.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "generated-calibration.md").write_text(report(rows, minutes))
    print((RESULTS / "generated-calibration.md").read_text())


if __name__ == "__main__":
    main()
