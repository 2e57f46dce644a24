"""How long the `sts` command takes to answer `--help` and a one-line config error.

Each command is run as a fresh process (what a user waits for), `--runs` times; prints the median
and writes `benchmarks/results/cli-start-<date>.json`. Run: `python benchmarks/cli_start.py`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "help": ["--help"],
    "config error": ["train", "demo", "stages.0.learning_rat=1e-3"],
    "unknown scheduler": ["train", "demo", "stages.0.lr_scheduler=bogus"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    seconds = {}
    for name, arguments in COMMANDS.items():
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "sts.cli", *arguments], capture_output=True)
            times.append(time.perf_counter() - started)
        seconds[name] = statistics.median(times)
        print(f"{name:<20} {seconds[name]:.2f} s (median of {args.runs})")
    date = datetime.date.today().isoformat()
    record = {"date": date, "machine": f"{platform.machine()}, {platform.python_version()}", "median_seconds": seconds}
    out = Path(__file__).parent / "results" / f"cli-start-{date}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
