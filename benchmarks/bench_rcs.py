"""RCS selection time against the pool size: one selection round at pools of 256, 512 and 1024 images.

  python benchmarks/bench_rcs.py [--pools 256 512 1024] [--size 16] [--unit 8] [--fraction 0.2]
                                 [--val-fraction 0.01] [--val-fixed 0] [--repeats 1]

Model: recipes/quickstart.toml (narrow ResNet-18, ACL-DS, PGD-3), untrained, at --size px on the CPU. Pool p takes
the first p digits training images; the validation set is the next round(--val-fraction·p) (the reference's 1 %)
or --val-fixed images. Each round: unit = --unit images (finer than a minibatch, so there are enough picks to see
the greedy search), budget = --fraction of the pool, head steps as in the reference (head_lr 0.01), RD attack
PGD-3. For reattack true and false, prints the time spent building the gradient bank (compute_gradients: the ACL
loss with its attack over the whole pool), the time in the greedy search (validation sketches, head steps, gains),
and both divided by their pool-256 value × p/256, so 1.00 means linear in the pool.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import rsslctl_plugins.rcs as rcs
from rsslctl.build import build_method, load_train_split
from rsslctl.coreset import SelectionContext, budget_for, run_selector
from rsslctl.recipe import load

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"


class Timed:
    """Wraps a module-level function of the rcs plugin and adds up the seconds spent in it."""

    def __init__(self, name: str) -> None:
        self.name, self.fn, self.seconds = name, getattr(rcs, name), 0.0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def one_round(context: SelectionContext, options: rcs.RCSOptions, budget: int) -> tuple[float, float, float]:
    """(total, gradient bank, greedy search) seconds of one selection round."""
    grads, search = Timed("compute_gradients"), Timed("greedy")
    rcs.compute_gradients, rcs.greedy = grads, search
    try:
        t = time.perf_counter()
        run_selector(rcs.RCS(options), context, budget)
        return time.perf_counter() - t, grads.seconds, search.seconds
    finally:
        rcs.compute_gradients, rcs.greedy = grads.fn, search.fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pools", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--unit", type=int, default=8)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--val-fixed", type=int, default=0, help="validation images, whatever the pool (0: --val-fraction)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--repeats", type=int, default=1, help="rounds per configuration (median reported)")
    args = ap.parse_args()
    recipe = load(RECIPE, [f"data.image_size={args.size}", "engine.device='cpu'", f"engine.precision='{args.precision}'",
                           f"schedule.batch_size={args.batch}"])
    torch.manual_seed(0)
    method = build_method(recipe, torch.device("cpu"))
    train = load_train_split(recipe)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; quickstart model at {args.size} px, batch "
          f"{args.batch}, unit {args.unit}, fraction {args.fraction}, RD attack PGD-3; precision: the selection runs "
          f"outside autocast (fp32)")
    print("| reattack | pool | validation | units | picks | total s | gradient bank s | greedy s | "
          "bank / linear | greedy / linear |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    warm = SelectionContext(train.images, train.labels, torch.arange(args.batch), torch.arange(args.batch, args.batch + 2),
                            args.batch, 7, method)
    one_round(warm, rcs.RCSOptions(unit=args.unit), args.batch)  # first-call costs (kernel selection, allocator)
    for reattack in (True, False):
        base = None
        for pool_size in args.pools:
            n_val = args.val_fixed or max(1, round(args.val_fraction * pool_size))
            if pool_size + n_val > len(train):
                raise SystemExit(f"pool {pool_size} + validation {n_val} exceeds the {len(train)} training images")
            context = SelectionContext(train.images, train.labels, torch.arange(pool_size),
                                       torch.arange(pool_size, pool_size + n_val), args.batch, 7, method)
            budget = budget_for(pool_size, args.fraction, args.batch)
            options = rcs.RCSOptions(unit=args.unit, reattack=reattack)
            runs = [one_round(context, options, budget) for _ in range(args.repeats)]
            total, bank, search = (statistics.median(r[i] for r in runs) for i in range(3))
            if base is None:
                base = (pool_size, bank, search)
            scale = pool_size / base[0]
            print(f"| {str(reattack).lower()} | {pool_size} | {n_val} | {pool_size // args.unit} | "
                  f"{budget // args.unit} | {total:.1f} | {bank:.1f} | {search:.2f} | {bank / (base[1] * scale):.2f} | "
                  f"{search / (base[2] * scale):.2f} |", flush=True)


if __name__ == "__main__":
    main()
