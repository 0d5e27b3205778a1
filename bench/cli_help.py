"""Wall time of `python -m autosplit --help` (issue 18): N fresh interpreters, median seconds.

A benchmark, not a test: run it by hand from the repository root and record the number in
docs/benchmarks.md::

    python bench/cli_help.py            # 20 runs
    python bench/cli_help.py 50 run     # 50 runs of `python -m autosplit run --help`
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def time_help(num_runs: int, *, command: list[str]) -> list[float]:
    """Seconds of each of `num_runs` runs of `python -m autosplit [command] --help`."""
    argv = [sys.executable, "-m", "autosplit", *command, "--help"]
    seconds = []
    for _ in range(num_runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str]) -> int:
    num_runs = int(argv[0]) if argv else 20
    command = argv[1:]
    time_help(2, command=command)  # warm the file cache and the bytecode
    seconds = time_help(num_runs, command=command)
    shown = " ".join(["autosplit", *command, "--help"])
    print(
        f"{shown}: median {statistics.median(seconds):.3f} s over {num_runs} runs "
        f"(min {min(seconds):.3f} s, max {max(seconds):.3f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
