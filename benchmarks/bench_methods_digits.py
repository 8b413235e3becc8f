"""Pretrain SimCLR, ACL, DynACL, ACL-AIR, EMP-SSL, CF-AMC-SSL, multi-task and ADIOS on the bundled digits with one small budget,
then evaluate each (linear probe on frozen features, clean and PGD-20 accuracy at ε 8/255).

Usage: python benchmarks/bench_methods_digits.py [--epochs 6] [--image-size 16] [--limit 640] [--eval-limit 200] [--out runs/bench_issue3]
       [--methods Multitask ADIOS]
Each method starts from its paper recipe (recipes/<name>.toml) with the same digits overrides: the quickstart
model's stage widths (narrow ResNet-18, channels 16-32-64-128; timm's 64-channel stem, as when the README table was
measured: the quickstart recipes now also set backbone.stem_width = 16), batch 128, 3-step training attack, 50-epoch
probe.
ACL-family methods use the quickstart optimiser (SGD lr 0.5); EMP-SSL methods keep their SGD lr 0.3.
CF-AMC-SSL runs a third of the epochs with m = 3 replays (the paper's 10 vs 30 epochs). Prints a Markdown
table with accuracies and wall times (pretraining, evaluation).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rsslctl.engine import Trainer
from rsslctl.commands.evaluate import evaluate_run
from rsslctl.recipe import load
from rsslctl.runs import prepare_run_dir

ROOT = Path(__file__).resolve().parent.parent
QUICK_OPT = ["optimizer.name=sgd", "optimizer.lr=0.5", "optimizer.weight_decay=1e-4", "schedule.warmup_epochs=1"]
EMP_SMALL = ["method.n_views=8", "method.pre_dim=512", "method.hidden_dim=512", "method.z_dim=128",
             "method.eval_views=4"]
METHODS = {  # label: (recipe, extra overrides)
    "SimCLR": ("simclr", QUICK_OPT),
    "ACL": ("acl", QUICK_OPT + ["attack.steps=3"]),
    "DynACL": ("dynacl", QUICK_OPT + ["attack.steps=3", "method.period=2"]),
    "ACL-AIR": ("air", QUICK_OPT + ["attack.steps=3"]),
    "EMP-SSL": ("empssl", EMP_SMALL),
    "CF-AMC-SSL": ("cf_amc_ssl", EMP_SMALL + ["method.replays=3"]),
    # SimCLR + rotation + jigsaw (equal weights) on one encoder; the quickstart optimiser with SimCLR's cosine
    "Multitask": ("mtssl_multitask", QUICK_OPT + ["schedule.kind=cosine", "schedule.min_lr=1e-6"]),
    # the same with a third of the LR: the loss is a sum of three task losses
    "Multitask-lr/3": ("mtssl_multitask", QUICK_OPT + ["schedule.kind=cosine", "schedule.min_lr=1e-6",
                                                       "optimizer.lr=0.1667"]),
    # 3 masks from a 16-wide U-Net occluder, CIFAR stem at 16 px, a 128-d head like the other rows
    "ADIOS": ("adios", QUICK_OPT + ["data.train_split=train", "backbone.cifar_stem=true", "method.num_masks=3",
                                    "method.mask_width=16", "encoder.head_hidden=128", "encoder.head_dim=128"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_issue3")
    ap.add_argument("--limit", type=int, default=640, help="training images used for pretraining (0 = all 1,347)")
    ap.add_argument("--eval-limit", type=int, default=200, help="test images for clean/PGD-20 accuracy (0 = all 450)")
    ap.add_argument("--only", "--methods", dest="only", nargs="*", default=list(METHODS), choices=list(METHODS),
                    help="rows to run (default: all)")
    args = ap.parse_args()
    rows = []
    for label in args.only:
        name, extra = METHODS[label]
        epochs = max(1, args.epochs // 3) if label == "CF-AMC-SSL" else args.epochs
        common = ["data.name=digits", f"data.image_size={args.image_size}", "engine.device=cpu",
                  "backbone.model_kwargs={channels=[16,32,64,128]}", f"schedule.epochs={epochs}",
                  "schedule.batch_size=128", "engine.checkpoint_every=1000", "evaluation.epochs=50",
                  "evaluation.lr=0.1", f"data.limit={args.limit}",
                  f"evaluation.limit={args.eval_limit}", f"run.output_dir={args.out}", f"run.name={name}"]
        recipe = load(ROOT / "recipes" / f"{name}.toml", common + extra)
        run_dir = args.out / name
        t0 = time.perf_counter()
        trainer = Trainer(recipe, run_dir, quiet=True)
        prepare_run_dir(recipe, run_dir, force=True)
        summary = trainer.fit()
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = evaluate_run(run_dir)
        t_eval = time.perf_counter() - t0
        rows.append((label, name, epochs, trainer.replays, summary["loss"], res["clean_accuracy"],
                     res["robust_accuracy"], t_train, t_eval))
        print(f"{label}: clean {100 * res['clean_accuracy']:.1f} %, PGD-20 {100 * res['robust_accuracy']:.1f} %, "
              f"pretrain {t_train:.0f} s, eval {t_eval:.0f} s", flush=True)
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, image size {args.image_size}, "
          f"{args.limit} pretraining images, {args.eval_limit} test images")
    print("| method | recipe | epochs × replays | final loss | clean acc | PGD-20 acc (8/255) | pretrain s | eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, name, ep, m, loss, clean, rob, tt, te in rows:
        print(f"| {label} | {name}.toml | {ep} × {m} | {loss:.3f} | {100 * clean:.1f} % | {100 * rob:.1f} % "
              f"| {tt:.0f} | {te:.0f} |")


if __name__ == "__main__":
    main()
