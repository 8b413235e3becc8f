"""The README's quickstart table: both quickstart recipes over several seeds, clean and PGD-20 accuracy as
mean ± standard deviation over the seeds and per seed, each run through the CLI exactly as a user runs it.
It prints the table exactly as README.md shows it (markdown), then the conditions line that goes under it.
Pretraining wall times are printed per run (not in the table: they depend on what else runs on the machine).

    .venv/bin/python benchmarks/bench_quickstart.py --seeds 0 1 2 --out /tmp/qs
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import torch

from rsslctl.eval.store import load_all

RECIPES = ("quickstart", "quickstart_simclr")


def run(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "rsslctl.cli", *args], check=True, stdout=subprocess.DEVNULL)


def method_label(run_dir: Path) -> str:
    """The method as the run's resolved recipe names it, e.g. ``acl (variant ds)``."""
    method = tomllib.loads((run_dir / "recipe.toml").read_text())["method"]
    return f"{method['name']} (variant {method['variant']})" if "variant" in method else method["name"]


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quickstart"))
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {r: [] for r in RECIPES}
    methods: dict[str, str] = {}
    for seed in args.seeds:
        for recipe in RECIPES:
            run_dir = args.out / f"{recipe}-seed{seed}"
            t0 = time.perf_counter()
            run(["pretrain", recipe, "--run-dir", str(run_dir), "--force", "--quiet", "--set", f"run.seed={seed}"])
            seconds = time.perf_counter() - t0
            run(["evaluate", str(run_dir), "--json", "--force"])
            result = load_all(run_dir)[0][1]  # the one evaluation of the shipped settings
            rows[recipe].append((100 * result["clean_accuracy"], 100 * result["robust_accuracy"]))
            methods[recipe] = method_label(run_dir)
            print(f"{recipe} seed {seed}: clean {rows[recipe][-1][0]:.2f} %, PGD-20 {rows[recipe][-1][1]:.2f} %, "
                  f"pretraining wall time {seconds:.0f} s", flush=True)
    print()
    print("| recipe | method | clean accuracy | PGD-20 accuracy | per seed (clean / PGD-20) |")
    print("|---|---|---|---|---|")
    for recipe, values in rows.items():
        per_seed = ", ".join(f"{clean:.2f} / {robust:.2f}" for clean, robust in values)
        print(f"| `{recipe}.toml` | {methods[recipe]} | {mean_std([v[0] for v in values])} "
              f"| {mean_std([v[1] for v in values])} | {per_seed} |")
    print()
    print(f"Seeds {', '.join(map(str, args.seeds))}; `benchmarks/bench_quickstart.py --seeds "
          f"{' '.join(map(str, args.seeds))}`; torch {torch.__version__}, {platform.machine()} CPU, "
          f"{torch.get_num_threads()} threads.")


if __name__ == "__main__":
    main()
