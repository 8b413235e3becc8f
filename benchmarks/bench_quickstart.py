"""The README's quickstart table: both quickstart recipes over several seeds, mean ± spread of clean and PGD-20
accuracy and of the pretraining wall time, each run through the CLI exactly as a user runs it.

    .venv/bin/python benchmarks/bench_quickstart.py --seeds 0 1 2 --out /tmp/qs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RECIPES = ("quickstart", "quickstart_simclr")


def run(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "rsslctl.cli", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quickstart"))
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float, float]]] = {r: [] for r in RECIPES}
    for seed in args.seeds:
        for recipe in RECIPES:
            run_dir = args.out / f"{recipe}-seed{seed}"
            t0 = time.perf_counter()
            run(["pretrain", recipe, "--run-dir", str(run_dir), "--force", "--quiet", "--set", f"run.seed={seed}"])
            seconds = time.perf_counter() - t0
            run(["evaluate", str(run_dir), "--json"])
            result = json.loads((run_dir / "eval.json").read_text())
            rows[recipe].append((100 * result["clean_accuracy"], 100 * result["robust_accuracy"], seconds))
            print(f"{recipe} seed {seed}: clean {rows[recipe][-1][0]:.2f} %, PGD-20 {rows[recipe][-1][1]:.2f} %, "
                  f"pretraining {seconds:.0f} s", flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}; seeds {args.seeds}")
    print("| recipe | clean accuracy | PGD-20 accuracy | pretraining wall time |")
    print("|---|---|---|---|")
    for recipe, values in rows.items():
        cells = []
        for i, unit in ((0, "%"), (1, "%"), (2, "s")):
            xs = [v[i] for v in values]
            spread = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{statistics.mean(xs):.2f} ± {spread:.2f} {unit} (min {min(xs):.2f}, max {max(xs):.2f})"
                         if unit == "%" else f"{statistics.mean(xs):.0f} ± {spread:.0f} s")
        print(f"| `{recipe}.toml` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
