"""ACL on the full set vs ACL-RCS and ACL-random coresets, side by side in one process.

Usage: python benchmarks/bench_coreset.py [--epochs 10] [--size 16] [--fractions 0.2 0.05] [--out DIR] [--threads N]

Every run starts from recipes/quickstart.toml (digits, narrow ResNet-18, ACL-DS, PGD-3), shown at ``--size`` px, with
the same epochs, batch size and seed; coreset runs hold out 1 % of the training split as RCS's unlabeled validation set,
train on the whole pool for ``--warmup`` epochs, then on the coreset, re-selected every ``--every`` epochs.
Prints wall time (selection included), speed-up over the full run, clean and PGD-20 accuracy of a linear probe,
and the selection overhead per round relative to one full training epoch. Small and CPU-sized on purpose.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from timing import load_average

from rsslctl.cli.evaluate import evaluate_run
from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load
from rsslctl.train.engine import Trainer

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"


def run(name: str, overrides: list[str], root: Path) -> dict:
    recipe = load(RECIPE, overrides)
    run_dir = root / name
    trainer = Trainer(recipe, run_dir, quiet=True)
    prepare_run_dir(recipe, run_dir, force=True)
    summary = trainer.fit()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    full = [r["seconds"] for r in epochs if r.get("images", 0) == max(e.get("images", 0) for e in epochs)]
    rounds = [r["selection_seconds"] for r in epochs if r.get("selected")]
    result = evaluate_run(run_dir, quiet=True)
    return {"name": name, "wall_s": summary["total_seconds"], "clean": result["clean_accuracy"],
            "robust": result["robust_accuracy"], "images_per_epoch": epochs[-1].get("images"),
            "full_epoch_s": statistics.median(full) if full else None,
            "selection_s": statistics.median(rounds) if rounds else None, "rounds": len(rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=16,
                        help="image size (quickstart: 32; 16 keeps the CPU budget small)")
    parser.add_argument("--lr", type=float, default=0.125, help="SGD peak LR (quickstart's 0.5 at batch 128, scaled)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.05])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep run directories and results.json here")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_coreset_"))
    common = [f"data.image_size={args.size}", f"schedule.epochs={args.epochs}", f"schedule.batch_size={args.batch}",
              f"optimizer.lr={args.lr}",
              f"run.seed={args.seed}", "engine.device='cpu'", f"engine.threads={args.threads}",
              f"engine.checkpoint_every={args.epochs}"]
    core = [f"coreset.warmup_epochs={args.warmup}", f"coreset.every={args.every}"]
    print(f"before: {load_average()}")
    rows = [run("acl-full", common, root)]
    for f in args.fractions:
        for selector in ("rcs", "random"):
            rows.append(run(f"acl-{selector}-{f:g}", common + core + [f"coreset.name='{selector}'",
                                                                         f"coreset.fraction={f}"], root))
    base = rows[0]["wall_s"]
    full_epoch = rows[0]["full_epoch_s"]
    print(f"digits {args.size} px, narrow ResNet-18, ACL-DS PGD-3, {args.epochs} epochs, batch {args.batch}, seed "
          f"{args.seed}, "
          f"torch threads {torch.get_num_threads()}; coreset warm-up {args.warmup}, re-selection every {args.every}")
    print("| run | images/epoch after warm-up | wall time (s) | speed-up | clean acc | PGD-20 acc | "
          "selection per round (× full epoch) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sel = f"{r['selection_s']:.1f} s ({r['selection_s'] / full_epoch:.2f}×), {r['rounds']} rounds" \
            if r["selection_s"] is not None else "–"
        print(f"| {r['name']} | {r['images_per_epoch']} | {r['wall_s']:.1f} | {base / r['wall_s']:.2f}× | "
              f"{100 * r['clean']:.1f} % | {100 * r['robust']:.1f} % | {sel} |")
    (root / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                   "rows": rows}, indent=2))
    print(f"results: {root / 'results.json'}")
    print(f"after: {load_average()} (one run per row: wall times vary with the load; compare rows of one run)")


if __name__ == "__main__":
    main()
