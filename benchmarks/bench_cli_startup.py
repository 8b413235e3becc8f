"""Start-up cost of the command line, against the imports it should and should not pay for.

Runs, in interleaved rounds on one thread (each round runs every case once, in a rotated order, so a burst of load
hits all of them alike), fresh interpreters for:

* ``import click, rich, pluggy`` — the floor: what the CLI itself is built on;
* ``import torch`` and ``import torch, timm`` — what a command that trains pays;
* ``rsslctl --help``, ``rsslctl recipe list`` and the validation-error path (``rsslctl pretrain quickstart --set
  method.nonexistent=1``, which must exit 2).

It prints each case's median wall time, and per-round ratios (case / floor, case / import torch + timm) as median
[min–max] over the rounds, plus the load average before and after. Targets: ``rsslctl --help`` within 3× the floor;
the validation error well under ``import torch, timm``. Run it on a quiet machine:

    python benchmarks/bench_cli_startup.py --rounds 15
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

PY = sys.executable
CLI = [PY, "-m", "rsslctl"]
CASES: dict[str, tuple[list[str], int]] = {  # name → (command, expected exit code)
    "click+rich+pluggy": ([PY, "-c", "import click, rich, pluggy"], 0),
    "import torch": ([PY, "-c", "import torch"], 0),
    "import torch+timm": ([PY, "-c", "import torch, timm"], 0),
    "rsslctl --help": ([*CLI, "--help"], 0),
    "rsslctl recipe list": ([*CLI, "recipe", "list"], 0),
    "validation error": ([*CLI, "pretrain", "quickstart", "--set", "method.nonexistent=1"], 2),
}
FLOOR, HEAVY = "click+rich+pluggy", "import torch+timm"
TARGETS = {"rsslctl --help": (FLOOR, 3.0), "validation error": (HEAVY, 0.5)}


def run_once(command: list[str], expected: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != expected:
        raise SystemExit(f"{' '.join(command[1:])}: exit code {proc.returncode}, expected {expected}: "
                         f"{proc.stderr.strip()[-300:]}")
    return seconds


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} [{min(values):.2f}–{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds (after one warm-up round)")
    args = parser.parse_args()
    env_threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    load_before = os.getloadavg()
    names = list(CASES)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(args.rounds + 1):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        measured = {n: run_once(*CASES[n]) for n in order}
        if round_:  # round 0 warms the file cache
            for n, t in measured.items():
                times[n].append(t)
    load_after = os.getloadavg()
    print(f"{args.rounds} rounds, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, thread env {env_threads}")
    print(f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"{'case':22} {'median s':>9}   {'÷ ' + FLOOR + ' [min–max]':>32}   {'÷ ' + HEAVY + ' [min–max]':>32}")
    for n in names:
        floor = [t / f for t, f in zip(times[n], times[FLOOR])]
        heavy = [t / h for t, h in zip(times[n], times[HEAVY])]
        print(f"{n:22} {statistics.median(times[n]):9.3f}   {spread(floor):>32}   {spread(heavy):>32}")
    for n, (ref, limit) in TARGETS.items():
        ratio = statistics.median(t / r for t, r in zip(times[n], times[ref]))
        print(f"target {n} ≤ {limit}× {ref}: median {ratio:.2f}× — {'met' if ratio <= limit else 'NOT met'}")


if __name__ == "__main__":
    main()
