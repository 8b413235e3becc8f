"""The digits leaderboard: every pretraining method at the quickstart's budget on scikit-learn's bundled digits,
several seeds each, made with two commands -- `rsslctl sweep` per method, then one `rsslctl compare` over all the
sweeps -- and, beside it, the direction each method's paper reports against its non-adversarial twin and whether it
holds here.

    .venv/bin/python benchmarks/digits_leaderboard.py --seeds 0 1 2 --out runs/digits [--lanes 2] [--only ACL SimCLR]

The budget is the quickstart's (recipes/quickstart.toml): digits at 32 px, the narrow ResNet-18 (stem and stages
16-32-64-128), 10 epochs of batch 128, a 3-step training attack, SGD lr 0.5 for the contrastive methods, and one
evaluator for every run (a linear probe of 50 epochs, batch 256, lr 0.1, weight decay 2e-4, then clean and PGD-20
accuracy at ε 8/255 on the 450 test digits). Each method starts from its paper recipe (recipes/<name>.toml) and
only the overrides listed in ROWS change it; the MAE rows and their reference train a tiny ViT instead (4×4 patches,
width 64, 4 blocks). The two-stage methods (AdvCL, DeACL) take the seed-0 SimCLR run as their teacher.

Each command is printed before it runs. Re-running the script skips finished runs (the sweeps resume). With
``--lanes N`` N sweeps run at a time, each with 1/N of the CPU threads.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RSSLCTL = [sys.executable, "-m", "rsslctl.cli"]
#: what every ResNet row shares: the quickstart's data, model, budget and evaluator
BUDGET = ["data.name=digits", "data.image_size=32", "backbone.model=resnet18", "backbone.cifar_stem=true",
          "backbone.stem_width=16", "backbone.model_kwargs={channels=[16,32,64,128]}", "schedule.epochs=10",
          "schedule.batch_size=128", "engine.checkpoint_every=5", "evaluation.epochs=50", "evaluation.lr=0.1",
          "evaluation.batch_size=256", "evaluation.weight_decay=2e-4"]
QUICK_OPT = ["optimizer.name=sgd", "optimizer.lr=0.5", "optimizer.weight_decay=1e-4", "schedule.warmup_epochs=1"]
EMP = ["method.n_views=8", "method.pre_dim=512", "method.hidden_dim=512", "method.z_dim=128", "method.eval_views=4"]
VIT = ["backbone.model=vit_tiny_patch16_224", "backbone.cifar_stem=false", "backbone.stem_width=0",
       "backbone.model_kwargs={img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4}",
       "optimizer.lr=1e-3", "schedule.warmup_epochs=1"]
MAE = ["method.decoder_width=64", "method.decoder_depth=1", "method.decoder_heads=4"]
#: label: (recipe, overrides, twin label, figure the paper improves over its twin). The twin is the method's
#: non-adversarial counterpart in this table: SimCLR for the contrastive methods (MoCo-style ones included: this
#: table has no MoCo row), EMP-SSL for the crop-based ones, MAE for the MAE family.
ROWS: dict[str, tuple[str, list[str], str | None, str | None]] = {
    "SimCLR": ("simclr", QUICK_OPT, None, None),
    "ACL": ("acl", QUICK_OPT + ["attack.steps=3"], "SimCLR", "PGD-20"),
    "DynACL": ("dynacl", QUICK_OPT + ["attack.steps=3", "method.period=2"], "SimCLR", "PGD-20"),
    "ACL-AIR": ("air", QUICK_OPT + ["attack.steps=3"], "SimCLR", "PGD-20"),
    "RoCL": ("rocl", QUICK_OPT + ["attack.steps=3"], "SimCLR", "PGD-20"),
    "AdvCL": ("advcl", QUICK_OPT + ["attack.steps=3"], "SimCLR", "PGD-20"),
    "DeACL": ("deacl", QUICK_OPT + ["attack.steps=3"], "SimCLR", "PGD-20"),
    "BYORL": ("byorl", QUICK_OPT + ["attack.steps=3", "encoder.head_hidden=512", "method.pred_hidden=512"],
              "SimCLR", "PGD-20"),
    "CLAE": ("clae", QUICK_OPT, "SimCLR", "clean"),
    "IFM": ("ifm", QUICK_OPT + ["schedule.kind=cosine"], "SimCLR", "clean"),
    "HCL": ("hcl", QUICK_OPT + ["schedule.kind=cosine"], "SimCLR", "clean"),
    "MoCHi": ("mochi", QUICK_OPT + ["method.queue_size=1024", "method.n_hard=256", "method.s1=256", "method.s2=128",
                                    "method.momentum=0.99"], "SimCLR", "clean"),
    "AdCo": ("adco", QUICK_OPT + ["method.bank_size=1024", "method.momentum=0.99"], "SimCLR", "clean"),
    "CaCo": ("caco", QUICK_OPT + ["method.bank_size=1024", "method.bank_warmup_epochs=1"], "SimCLR", "clean"),
    "ADIOS": ("adios", QUICK_OPT + ["data.train_split=train", "method.num_masks=3", "method.mask_width=16",
                                    "encoder.head_hidden=128", "encoder.head_dim=128"], "SimCLR", "clean"),
    "Multitask": ("mtssl_multitask", QUICK_OPT + ["schedule.kind=cosine", "schedule.min_lr=1e-6",
                                                  "optimizer.lr=0.1667"], "SimCLR", "clean"),
    "EMP-SSL": ("empssl", EMP, None, None),
    "CF-AMC-SSL": ("cf_amc_ssl", EMP + ["method.replays=3", "schedule.epochs=4"], "EMP-SSL", "PGD-20"),
    "MAE": ("mae_cifar", VIT + MAE, None, None),
    "Adversarial MAE": ("mae_adv", VIT + MAE + ["attack.steps=3"], "MAE", "PGD-20"),
    "AdPE": ("mae_adpe", VIT + MAE, "MAE", "clean"),
}
TEACHER = "SimCLR"


def slug(label: str) -> str:
    return label.lower().replace(" ", "-")


def sweep_command(label: str, args: argparse.Namespace) -> list[str]:
    recipe, overrides, _, _ = ROWS[label]
    sets = BUDGET + overrides
    if recipe in ("advcl", "deacl"):
        sets = sets + [f"method.teacher={str(teacher_dir(args))!r}"]
    cmd = ["sweep", recipe, "--seeds", *map(str, args.seeds), "--out", str(args.out / slug(label)), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    return cmd + args.extra


def teacher_dir(args: argparse.Namespace) -> Path:
    """The seed-0 (first seed) run directory of the SimCLR sweep."""
    sweep = args.out / slug(TEACHER)
    runs = json.loads((sweep / "sweep.json").read_text())["runs"]
    return sweep / next(r["dir"] for r in runs if r["seed"] == args.seeds[0])


def run(cmd: list[str], threads: int | None = None, capture: bool = False) -> str:
    print("$ rsslctl " + shlex.join(cmd), flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    done = subprocess.run(RSSLCTL + cmd, env=env, text=True, stdout=subprocess.PIPE if capture else None)
    if done.returncode not in (0, 1):  # 1: some runs failed, the sweep says which; the table shows the others
        raise SystemExit(f"rsslctl {cmd[0]} exited {done.returncode}")
    return done.stdout or ""


def directions(cmp: dict, labels: list[str]) -> str:
    """Markdown: per method, its twin, what its paper reports and what this table shows."""
    rows = {r["name"]: r["figures"] for r in cmp["rows"] if r["evaluation"] == "probe"}
    lines = ["| method | twin here | paper reports | here (method − twin) | holds |", "|---|---|---|---|---|"]
    for label in labels:
        _, _, twin, figure = ROWS[label]
        if twin is None or slug(label) not in rows or slug(twin) not in rows:
            continue
        a, b = rows[slug(label)].get(figure), rows[slug(twin)].get(figure)
        if not a or not b:
            continue
        diff = a["mean"] - b["mean"]
        sa, sb = a["std"] or 0.0, b["std"] or 0.0
        apart = a["mean"] - sa > b["mean"] + sb or a["mean"] + sa < b["mean"] - sb
        verdict = "yes" if diff > 0 else "no, reversed"
        verdict += " (beyond the spread)" if apart else " (within the spread)"
        lines.append(f"| {label} | {twin} | {figure} above {twin} | {diff:+.2f} points | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/digits"))
    ap.add_argument("--lanes", type=int, default=1, help="sweeps at a time (each with 1/N of the threads)")
    ap.add_argument("--only", nargs="+", default=list(ROWS), metavar="LABEL")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `rsslctl sweep` arguments")
    args = ap.parse_args()
    unknown = [x for x in args.only if x not in ROWS]
    if unknown:
        ap.error(f"--only: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    labels = [x for x in ROWS if x in args.only]
    threads = max(1, (os.cpu_count() or 1) // args.lanes) if args.lanes > 1 else None
    if any(ROWS[x][0] in ("advcl", "deacl") for x in labels) or TEACHER in labels:
        run(sweep_command(TEACHER, args), threads)  # the two-stage rows need its runs
    rest = [x for x in labels if x != TEACHER]
    with ThreadPoolExecutor(args.lanes) as pool:
        list(pool.map(lambda x: run(sweep_command(x, args), threads), rest))
    sweeps = [str(args.out / slug(x)) for x in labels]
    print(run(["compare", *sweeps, "--columns", "none", "--format", "markdown"], capture=True))
    cmp = json.loads(run(["compare", *sweeps, "--columns", "none", "--format", "json"], capture=True))
    print(directions(cmp, labels))


if __name__ == "__main__":
    main()
