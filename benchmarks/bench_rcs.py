"""RCS selection time against the pool size: one selection round at pools of 256, 512 and 1024 images.

  python benchmarks/bench_rcs.py [--pools 256 512 1024] [--size 16] [--unit 8] [--fraction 0.25]
                                 [--val-fraction 0.01] [--val-fixed 0] [--rounds 3] [--threads 0]

Model: recipes/quickstart.toml (narrow ResNet-18, ACL-DS, PGD-3), untrained, at --size px on the CPU. Pool p takes
the first p digits training images; the validation set is the next round(--val-fraction·p) (the reference's 1 %)
or --val-fixed images. Each round: unit = --unit images (finer than a minibatch, so there are enough picks to see
the greedy search), budget = --fraction of the pool, head steps as in the reference (head_lr 0.01), RD attack
PGD-3. For reattack true and false, prints the time spent building the gradient bank (compute_gradients: the ACL
loss with its attack over the whole pool) and in the greedy search (validation sketches, head steps, gains), each
also divided by its smallest-pool value × p/p_min, so 1.00 means linear in the pool; and, because times on a shared
machine drift, the images the backbone processed (forward passes, attack steps included) in each phase, which do
not. Rounds are interleaved over the pool sizes and medians reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import rsslctl_plugins.selectors.rcs as rcs
from rsslctl.method.coreset import SelectionContext, budget_for, run_selector
from rsslctl.run.build import build_method, load_train_split
from rsslctl.run.recipe import load

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"


class Phase:
    """Wraps a module-level function of the rcs plugin: adds up its seconds and the images the backbone saw in it."""

    current: str | None = None

    def __init__(self, name: str) -> None:
        self.name, self.fn, self.seconds, self.images = name, getattr(rcs, name), 0.0, 0

    def __call__(self, *args, **kwargs):
        t, outer, Phase.current = time.perf_counter(), Phase.current, self.name
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t
            Phase.current = outer


def one_round(context: SelectionContext, options: rcs.RCSOptions, budget: int) -> dict[str, float]:
    """Seconds and backbone image-forwards of one selection round, split into gradient bank and greedy search."""
    bank, search = Phase("compute_gradients"), Phase("greedy")
    seen = {"compute_gradients": 0, "greedy": 0}

    def count(module, inputs, output) -> None:
        if Phase.current is not None:
            seen[Phase.current] += inputs[0].shape[0]

    hook = context.method.encoder.backbone.register_forward_hook(count)
    rcs.compute_gradients, rcs.greedy = bank, search
    try:
        t = time.perf_counter()
        run_selector(rcs.RCS(options), context, budget)
        return {"total": time.perf_counter() - t, "bank": bank.seconds, "greedy": search.seconds,
                "bank_images": seen["compute_gradients"], "greedy_images": seen["greedy"]}
    finally:
        rcs.compute_gradients, rcs.greedy = bank.fn, search.fn
        hook.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pools", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--unit", type=int, default=8)
    ap.add_argument("--fraction", type=float, default=0.25, help="0.25: whole minibatches at every pool size")
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--val-fixed", type=int, default=0, help="validation images, whatever the pool (0: --val-fraction)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the pools (medians reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load(RECIPE, [f"data.image_size={args.size}", "engine.device='cpu'", f"schedule.batch_size={args.batch}"])
    torch.manual_seed(0)
    method = build_method(recipe, torch.device("cpu"))
    train = load_train_split(recipe)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; quickstart model at {args.size} px (fp32: selection runs "
          f"outside autocast), batch {args.batch}, unit {args.unit}, fraction {args.fraction}, RD attack PGD-3")
    warm = SelectionContext(train.images, train.labels, torch.arange(args.batch),
                            torch.arange(args.batch, args.batch + 2), args.batch, 7, method)
    one_round(warm, rcs.RCSOptions(unit=args.unit), args.batch)  # first-call costs (kernel selection, allocator)
    print("| reattack | pool | validation | units | picks | total s | bank s | greedy s | bank s / linear | "
          "greedy s / linear | bank backbone images | greedy backbone images | greedy images / linear |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for reattack in (True, False):
        results: dict[int, list[dict[str, float]]] = {p: [] for p in args.pools}
        setups = {}
        for pool_size in args.pools:
            n_val = args.val_fixed or max(1, round(args.val_fraction * pool_size))
            if pool_size + n_val > len(train):
                raise SystemExit(f"pool {pool_size} + validation {n_val} exceeds the {len(train)} training images")
            setups[pool_size] = (SelectionContext(train.images, train.labels, torch.arange(pool_size),
                                                  torch.arange(pool_size, pool_size + n_val), args.batch, 7, method),
                                 budget_for(pool_size, args.fraction, args.batch), n_val)
        for r in range(args.rounds):  # interleaved, so load changes hit every pool size alike
            for pool_size in (args.pools if r % 2 == 0 else args.pools[::-1]):
                context, budget, _ = setups[pool_size]
                results[pool_size].append(one_round(context, rcs.RCSOptions(unit=args.unit, reattack=reattack), budget))
        base = None
        for pool_size in args.pools:
            med = {k: statistics.median(x[k] for x in results[pool_size]) for k in results[pool_size][0]}
            base = base or (pool_size, med)
            scale = pool_size / base[0]
            _, budget, n_val = setups[pool_size]
            greedy_lin = (f"{med['greedy_images'] / (base[1]['greedy_images'] * scale):.2f}"
                          if base[1]["greedy_images"] else "–")
            print(f"| {str(reattack).lower()} | {pool_size} | {n_val} | {pool_size // args.unit} | "
                  f"{budget // args.unit} | "
                  f"{med['total']:.1f} | {med['bank']:.1f} | {med['greedy']:.2f} | "
                  f"{med['bank'] / (base[1]['bank'] * scale):.2f} | {med['greedy'] / (base[1]['greedy'] * scale):.2f} "
                  "| "
                  f"{med['bank_images']:.0f} | {med['greedy_images']:.0f} | {greedy_lin} |", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
