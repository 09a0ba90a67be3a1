"""Start-up and inspect times of the `metanet` CLI, written to benchmarks/results/cli.md.

Run: .venv/bin/python benchmarks/cli_startup.py   (the target: `metanet --help` under 1.5 s)
"""

import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "metanet --help": ["--help"],
    "metanet --version": ["--version"],
    "metanet inspect all-MiniLM-L6-v2 --json": ["inspect", "all-MiniLM-L6-v2", "--json"],
    "metanet graph all-MiniLM-L6-v2 --layer 0": ["graph", "all-MiniLM-L6-v2", "--layer", "0"],
}
REPEATS = 5


def median_seconds(args: list[str]) -> float:
    exe = shutil.which("metanet", path=str(Path(sys.executable).parent)) or "metanet"
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run([exe, *args], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    rows = [f"| `{name}` | {median_seconds(args):.2f} |" for name, args in COMMANDS.items()]
    machine = f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, Python {platform.python_version()}"
    text = "\n".join(
        [
            "# CLI start-up",
            "",
            f"Median wall time of {REPEATS} runs each, on {machine} (no GPU). "
            "Target: `metanet --help` under 1.5 s (heavy libraries load inside commands).",
            "",
            "| command | seconds |",
            "|---|---|",
            *rows,
            "",
        ]
    )
    out = Path(__file__).parent / "results" / "cli.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
