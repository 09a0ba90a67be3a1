"""benchmarks/moe_kernels.py still runs: its --smoke mode (every part at tiny sizes, CPU) in a subprocess."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None  # without it the smoke run skips decode and --tune


def test_kernel_benchmark_smoke_run_writes_measured_rows_and_names_the_device(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.moe_kernels", "--smoke", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads((tmp_path / "smoke.json").read_text())
    assert results["errors"] == []
    assert {(r["routing"], r["tokens"]) for r in results["rows"]} == {(routing, t) for routing in ("trace", "uniform") for t in (1, 4, 64)}
    for row in results["rows"]:
        assert row["dense_ms"] > 0 and row["moe_ms"] > 0 and row["speedup"] > 0
        assert (row["tokens"] <= 16) == (row.get("moe_host_ms", 0) > 0 and row.get("dense_host_ms", 0) > 0)  # decode calls' host time
        assert all(ms > 0 for ms in row["paths"].values())
        assert set(row["paths"]) >= {"grouped", "dense", "reference"}
        assert all(error < 2e-2 for error in row["rel_err"].values())  # bf16 outputs of every path agree with the reference
    if HAS_TRITON:
        assert any("decode" in row["paths"] for row in results["rows"])  # Triton's interpreter ran the decode kernels
        assert results["tune"]["rows"] and all(r["ms"] > 0 for r in results["tune"]["rows"])
        assert results["tune"]["chosen"]["tokens"] == 1 and "tuning at T=1" in (tmp_path / "smoke.md").read_text()  # the sweep ran the tuned kernels
    runs = results["e2e"]["runs"]
    assert {(r["model"], r["mode"]) for r in runs} == {(m, mode) for m in ("dense", "moe") for mode in ("generate", "steps")}
    assert all(r["tokens_per_s"] > 0 for r in runs)
    assert all(r["matches_generate"] for r in runs if r["mode"] == "steps")  # static-cache steps decode what generate decodes
    markdown = (tmp_path / "smoke.md").read_text()
    assert results["device"]["name"] in markdown
    assert "all-MiniLM-L6-v2" in markdown  # where the replayed routing comes from
    choice = markdown.split("## Path choice")[1].split("## ")[0]  # every timed row: auto path against the fastest forced one
    assert sum(line.startswith("| 512 | 16 |") for line in choice.splitlines()) == len(results["rows"])
