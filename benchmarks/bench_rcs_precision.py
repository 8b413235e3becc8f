"""How much of an RCS coreset changes when its selection round runs in bf16 instead of fp32, on trained encoders.

    .venv/bin/python benchmarks/bench_rcs_precision.py RUN_DIR [RUN_DIR ...] [--fraction 0.1] [--out DIR]

For each pretraining run (e.g. the ACL runs of the digits leaderboard, ``runs/digits/acl/*``) it selects a coreset
twice with ``rsslctl select-coreset --run-dir RUN`` from the run's newest checkpoint: once with
``coreset.precision = "fp32"`` and once with ``engine.precision = "bf16"`` and ``coreset.precision = "run"`` (the
round under the training step's bf16 autocast), everything else equal, and prints the share of the fp32 coreset's
images that the bf16 coreset also holds, per run and as median (min–max) over the runs. Units of ``--unit`` images
(8 by default): with the reference's minibatch units a 10 % coreset of the digits is a single unit, and the overlap
could only be 0 or 100 %.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def select(run_dir: Path, out: Path, fraction: float, sets: list[str], precision: str) -> set[int]:
    args = [sys.executable, "-m", "rsslctl.cli", "select-coreset", "--run-dir", str(run_dir), "--fraction",
            str(fraction), "--out", str(out), "--force"]
    for s in sets:
        args += ["--set", s]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    selection = json.loads(out.read_text())
    assert selection["precision"] == precision, (selection["precision"], precision)  # the round ran as asked
    return set(selection["indices"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--unit", type=int, default=8, help="images per selection unit (coreset.unit; 0 = a minibatch)")
    args = ap.parse_args()
    same = [f"coreset.unit={args.unit}"]
    shares = []
    print("| run | coreset images | shared with fp32 |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for run_dir in args.runs:
            fp32 = select(run_dir, Path(tmp) / "fp32.json", args.fraction, [*same, "coreset.precision='fp32'"], "fp32")
            bf16 = select(run_dir, Path(tmp) / "bf16.json", args.fraction,
                          [*same, "engine.precision='bf16'", "coreset.precision='run'"], "bf16 autocast")
            shares.append(100 * len(fp32 & bf16) / len(fp32))
            print(f"| {run_dir} | {len(fp32)} | {shares[-1]:.0f} % |", flush=True)
    print(f"\nshared with fp32: median {statistics.median(shares):.0f} % (min {min(shares):.0f} %, max "
          f"{max(shares):.0f} %) over {len(shares)} runs; fraction {args.fraction}, units of {args.unit} images")


if __name__ == "__main__":
    main()
