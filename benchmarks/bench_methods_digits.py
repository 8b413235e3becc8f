"""Pretrain SimCLR, ACL, DynACL, ACL-AIR, EMP-SSL, CF-AMC-SSL, RoCL, AdvCL, BYORL, CLAE, DeACL, IFM, HCL, MoCHi,
AdCo, CaCo, multi-task pretraining, ADIOS and, on a tiny ViT, SimCLR, MAE, adversarial MAE and AdPE on the bundled
digits with one small budget, then evaluate each (linear probe on frozen features, clean and PGD-20 accuracy at ε
8/255).

Usage: python benchmarks/bench_methods_digits.py [--epochs 6] [--image-size 16] [--limit 640] [--eval-limit 200]
       [--out runs/bench_issue3] [--only LABEL ...] (--methods is the same; e.g. --only RoCL MAE "SimCLR (ViT)")
Each method starts from its paper recipe (recipes/<name>.toml) with the same digits overrides: the quickstart
model's stage widths (narrow ResNet-18, channels 16-32-64-128; timm's 64-channel stem, as when its earlier table was
measured: the quickstart recipes now also set backbone.stem_width = 16), batch 128, 3-step training attack, 50-epoch
probe.
ACL-family methods use the quickstart optimiser (SGD lr 0.5); EMP-SSL methods keep their SGD lr 0.3.
CF-AMC-SSL runs a third of the epochs with m = 3 replays (the paper's 10 vs 30 epochs). The contrastive-family
methods use the quickstart optimiser too; BYORL's projector and predictor are 512 wide here. Two-stage methods
(AdvCL's pseudo labels, DeACL's teacher) take the SimCLR row's run (<out>/simclr) as their teacher, pretrained
first when it is missing (its time is not counted in their rows). The ViT rows replace the ResNet by a tiny ViT
(TINY_VIT) and train with AdamW lr 1e-3; the MAE rows use a 64-wide, 1-block decoder. Prints a Markdown table
with accuracies and wall times (pretraining, evaluation).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rsslctl.cli.evaluate import evaluate_run
from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load
from rsslctl.runtime.checkpoint import latest_checkpoint
from rsslctl.train.engine import Trainer

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
    "RoCL": ("rocl", QUICK_OPT + ["attack.steps=3"]),
    "AdvCL": ("advcl", QUICK_OPT + ["attack.steps=3"]),
    "BYORL": ("byorl", QUICK_OPT + ["attack.steps=3", "encoder.head_hidden=512", "method.pred_hidden=512"]),
    "CLAE": ("clae", QUICK_OPT),
    "DeACL": ("deacl", QUICK_OPT + ["attack.steps=3"]),
    # issue 12, feature-level and memory-based adversaries: quickstart optimiser (cosine, as the SimCLR row); memory
    # sized to the digits run (640 images × 6 epochs = 3,840 keys) and a faster key encoder for its 30 steps
    "IFM": ("ifm", QUICK_OPT + ["schedule.kind=cosine"]),
    "HCL": ("hcl", QUICK_OPT + ["schedule.kind=cosine"]),
    "MoCHi": ("mochi", QUICK_OPT + ["method.queue_size=512", "method.n_hard=128", "method.s1=128", "method.s2=64",
                                    "method.momentum=0.99"]),
    "AdCo": ("adco", QUICK_OPT + ["method.bank_size=512", "method.momentum=0.99"]),
    "CaCo": ("caco", QUICK_OPT + ["method.bank_size=512", "method.bank_warmup_epochs=1"]),
    # vision transformers (a tiny ViT instead of the ResNet, see TINY_VIT): MAE and its adversaries, and SimCLR on the
    # same ViT as their contrastive reference
    "SimCLR (ViT)": ("simclr", ["optimizer.name=adamw", "optimizer.lr=1e-3", "optimizer.weight_decay=0.05",
                                "schedule.warmup_epochs=1"]),
    "MAE": ("mae_cifar", []),
    "Adversarial MAE": ("mae_adv", ["attack.steps=3"]),
    "AdPE": ("mae_adpe", []),
    # SimCLR + rotation + jigsaw (equal weights) on one encoder; the quickstart optimiser with SimCLR's cosine
    "Multitask": ("mtssl_multitask", QUICK_OPT + ["schedule.kind=cosine", "schedule.min_lr=1e-6"]),
    # the same with a third of the LR: the loss is a sum of three task losses
    "Multitask-lr/3": ("mtssl_multitask", QUICK_OPT + ["schedule.kind=cosine", "schedule.min_lr=1e-6",
                                                       "optimizer.lr=0.1667"]),
    # 3 masks from a 16-wide U-Net occluder, CIFAR stem at 16 px, a 128-d head like the other rows
    "ADIOS": ("adios", QUICK_OPT + ["data.train_split=train", "backbone.cifar_stem=true", "method.num_masks=3",
                                    "method.mask_width=16", "encoder.head_hidden=128", "encoder.head_dim=128"]),
}
#: the tiny ViT of the ViT rows: 16 px digits in 2×2 patches (64 tokens), width 64, 4 blocks of 4 heads
TINY_VIT = ["backbone.model=vit_tiny_patch16_224", "backbone.cifar_stem=false",
            "backbone.model_kwargs={{img_size={size}, patch_size=2, embed_dim=64, depth=4, num_heads=4}}"]
MAE_SMALL = ["method.decoder_width=64", "method.decoder_depth=1", "method.decoder_heads=4", "optimizer.lr=1e-3",
             "schedule.warmup_epochs=1"]
TEACHER = "SimCLR"  # the row whose run is the teacher of two-stage methods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_issue3")
    ap.add_argument("--limit", type=int, default=640, help="training images used for pretraining (0 = all 1,347)")
    ap.add_argument("--eval-limit", type=int, default=200, help="test images for clean/PGD-20 accuracy (0 = all 450)")
    ap.add_argument("--only", "--methods", nargs="*", default=list(METHODS), help="labels of the rows to run")
    args = ap.parse_args()
    unknown = sorted(set(args.only) - set(METHODS))
    if unknown:
        ap.error(f"--only: unknown methods {unknown}; choose from {', '.join(METHODS)}")
    rows = [run_row(label, args) for label in args.only]
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, image size {args.image_size}, "
          f"{args.limit} pretraining images, {args.eval_limit} test images")
    print("| method | recipe | epochs × replays | final loss | clean acc | PGD-20 acc (8/255) | pretrain s | eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, name, ep, m, loss, clean, rob, tt, te in rows:
        print(f"| {label} | {name}.toml | {ep} × {m} | {loss:.3f} | {100 * clean:.1f} % | {100 * rob:.1f} % "
              f"| {tt:.0f} | {te:.0f} |")


def run_row(label: str, args: argparse.Namespace) -> tuple:
    """Pretrain one row's recipe with the shared digits overrides, then evaluate it; the row of the table."""
    name, extra = METHODS[label]
    if "teacher" in load(ROOT / "recipes" / f"{name}.toml").resolved["method"]:
        teacher = args.out / METHODS[TEACHER][0]
        if latest_checkpoint(teacher) is None:
            print(f"{label}: pretraining its teacher ({TEACHER}) first", flush=True)
            run_row(TEACHER, args)
        extra = extra + [f"method.teacher={str(teacher)!r}"]
    epochs = max(1, args.epochs // 3) if label == "CF-AMC-SSL" else args.epochs
    common = ["data.name=digits", f"data.image_size={args.image_size}", "engine.device=cpu",
              "backbone.model_kwargs={channels=[16,32,64,128]}", f"schedule.epochs={epochs}",
              "schedule.batch_size=128", "engine.checkpoint_every=1000", "evaluation.epochs=50",
              "evaluation.lr=0.1", f"data.limit={args.limit}",
              f"evaluation.limit={args.eval_limit}", f"run.output_dir={args.out}", f"run.name={name}"]
    vit = "ViT" in label or name.startswith("mae")
    if vit:
        common = [o for o in common if not o.startswith("backbone.model_kwargs")]
        common += [o.format(size=args.image_size) for o in TINY_VIT]
        extra = (MAE_SMALL if name.startswith("mae") else []) + extra
    recipe = load(ROOT / "recipes" / f"{name}.toml", common + extra)
    run_dir = args.out / (f"{name}_vit" if vit and not name.startswith("mae") else name)
    t0 = time.perf_counter()
    trainer = Trainer(recipe, run_dir, quiet=True)
    prepare_run_dir(recipe, run_dir, force=True)
    summary = trainer.fit()
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate_run(run_dir)
    t_eval = time.perf_counter() - t0
    print(f"{label}: clean {100 * res['clean_accuracy']:.1f} %, PGD-20 {100 * res['robust_accuracy']:.1f} %, "
          f"pretrain {t_train:.0f} s, eval {t_eval:.0f} s", flush=True)
    return (label, name, epochs, trainer.replays, summary["loss"], res["clean_accuracy"], res["robust_accuracy"],
            t_train, t_eval)


if __name__ == "__main__":
    main()
