"""`rsslctl finetune`: SLF, ALF and AFF (see rsslctl.train.classify) from a run directory or an external timm encoder.

Every mode starts from the ``pgd`` route of a dual-BN checkpoint; the saved model is the ``pgd`` route.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from rsslctl.base import registry
from rsslctl.base.errors import TrainingDiverged, UserError
from rsslctl.cli.common import (
    SET,
    LaunchCommand,
    launch_options,
    launch_spec,
    parse_eps,
    show_report,
    start_ranks,
    suite_from_flags,
    suite_options,
    user_errors,
)
from rsslctl.nn.options import IMAGENET_MEAN, IMAGENET_STD
from rsslctl.run.directory import RECIPE_FILE, RunLock, load_run_recipe, refuse_existing
from rsslctl.run.recipe import Recipe, resolve, shipped_defaults

if TYPE_CHECKING:  # the torch side is imported inside the functions: `rsslctl finetune --help` imports no torch
    import torch
    from torch import Tensor

    from rsslctl.method.base import FinetuneRows
    from rsslctl.train.classify import Classifier, FinetuneConfig


def finetune_rows() -> FinetuneRows:
    """Every row of the fine-tuning hyper-parameter table declared by an installed method."""
    rows: dict[str, Any] = {}
    for name in registry.registry().names("method"):
        rows.update(registry.get("method", name).finetune_rows)
    return rows


@dataclasses.dataclass
class Pretrained:
    """A pretrained encoder ready to fine-tune: backbone spec + weights (dual-BN layout when ``dual_bn``)."""

    backbone: dict[str, Any]
    state: dict[str, Tensor]
    dual_bn: bool
    mean: tuple
    std: tuple
    pretraining: str
    recipe_raw: dict[str, Any]
    origin: str
    random_init: bool = False  # the no-pretraining baseline: same architecture, fresh random weights

    def net(self, num_classes: int, dual: bool) -> Classifier:
        """Fresh classifier initialised from the ``pgd`` route (or both routes when ``dual``); random weights for the
        no-pretraining baseline."""
        from rsslctl.nn.encoder import collapse_bn_state
        from rsslctl.train.classify import build_backbone, encoder_classifier, load_strict
        dual = dual and self.dual_bn
        net = encoder_classifier(build_backbone(self.backbone), self.mean, self.std, num_classes, dual)
        if not self.random_init:
            state = self.state if dual or not self.dual_bn else collapse_bn_state(self.state, "pgd")
            load_strict(net.body.backbone, state, self.origin)
        return net


def random_source(model: str, cifar_stem: bool | None) -> Pretrained:
    """The no-pretraining baseline on a timm model of the default backbone plugin (ImageNet mean/std)."""
    spec = {"name": shipped_defaults()["recipe"]["backbone"]["name"],
            "options": {"model": model, "cifar_stem": bool(cifar_stem)}}
    return Pretrained(spec, {}, False, IMAGENET_MEAN, IMAGENET_STD, "other", {}, f"random init ({model})", True)


def from_run(run_dir: Path, overrides: list[str] = ()) -> Pretrained:
    """The newest checkpoint of a pretraining run (the encoder a method exports for evaluation). A run that a
    post-processing step wrote may name its own hyper-parameter row in the checkpoint's metadata."""
    import torch

    from rsslctl.run.build import load_trained_method
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir, overrides)
    method, ckpt, meta = load_trained_method(run_dir, recipe, torch.device("cpu"), "fine-tune")
    enc = method.eval_encoder()
    bb = recipe.resolved["backbone"]
    row = meta.get("finetune_row") or method.finetune_row() or "other"
    return Pretrained({"name": bb["name"], "options": {k: v for k, v in bb.items() if k != "name"}},
                      {k: v.clone() for k, v in enc.backbone.state_dict().items()}, enc.dual_bn,
                      tuple(recipe.encoder.mean), tuple(recipe.encoder.std), row,
                      tomllib.loads((run_dir / RECIPE_FILE).read_text()), str(ckpt))


def from_safetensors(weights: Path, model: str | None, cifar_stem: bool | None) -> Pretrained:
    """An external backbone of the default backbone plugin; metadata written by `rsslctl export` supplies defaults
    (model, stem, mean/std)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from rsslctl.runtime.checkpoint import refuse_nonfinite
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"--weights: file not found: {weights.resolve()}")
    try:
        with safe_open(str(weights), "pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(weights))
    except Exception as exc:  # not a safetensors file
        raise UserError(f"--weights: {weights} is not a readable safetensors file ({exc})") from None
    refuse_nonfinite(state, str(weights))
    try:
        info = json.loads(meta.get("rsslctl", "{}"))
    except ValueError:
        info = {}
    if not isinstance(info, dict) or not isinstance(info.get("backbone", {}), dict):
        info = {}
    bb = info.get("backbone", {})
    model = model or bb.get("model")
    if not model:
        raise UserError(f"--weights: {weights} does not say which model it holds; pass --timm MODEL")
    stem = cifar_stem if cifar_stem is not None else bool(bb.get("cifar_stem", False))
    kwargs = bb.get("model_kwargs", {}) if bb.get("model") == model else {}
    spec = {"name": shipped_defaults()["recipe"]["backbone"]["name"],
            "options": {"model": model, "cifar_stem": stem, "model_kwargs": kwargs}}
    return Pretrained(spec, state, False, tuple(info.get("mean", IMAGENET_MEAN)), tuple(info.get("std", IMAGENET_STD)),
                      "other", {}, str(weights))


def downstream_recipe(base: dict[str, Any], data: str | None, data_root: str | None, image_size: int | None,
                      overrides: list[str]) -> Recipe:
    """The run's data and engine settings (or defaults) with the downstream dataset swapped in for transfer."""
    table = dict(base.get("data", {}))
    if data and data != table.get("name"):
        table = {k: table[k] for k in ("root", "download", "image_size") if k in table} | {"name": data}
    if data_root:
        table["root"] = data_root
    if image_size:
        table["image_size"] = image_size
    raw = {"data": table, "engine": dict(base.get("engine", {})), "evaluation": dict(base.get("evaluation", {}))}
    return resolve(raw, overrides, "fine-tuning", only=())


def train(cfg: FinetuneConfig, net: Classifier, images: Tensor, labels: Tensor, device: torch.device,
          precision: str = "fp32", log: Any = None, quiet: bool = True) -> dict[str, float]:
    """Fine-tune ``net`` in place with ``cfg``; images uint8 on ``device``. Returns the last epoch's metrics."""
    import torch
    import torch.nn.functional as F

    from rsslctl.adversary.attack import make_attack
    from rsslctl.train.classify import LoopSettings, crop_flip, trades_adversary, trades_loss, train_classifier
    encoder = net.body
    clean_route = "normal" if encoder.dual_bn else "pgd"  # AFF, dual BN: clean TRADES term on the normal route
    linear = cfg.mode in ("SLF", "ALF")
    encoder.requires_grad_(not linear)
    attack = (make_attack(cfg.attack, "fine-tuning attack", known_only=True, eps=cfg.eps, step_size=cfg.step_size,
                          steps=cfg.train_steps, random_start=True, clamp_start=cfg.clamp_start)
              if cfg.mode == "ALF" else None)

    def step_loss(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if cfg.mode == "AFF":
            x_adv = trades_adversary(net, x, clean_route, cfg.eps, cfg.step_size, cfg.train_steps)
            logits = net(x, clean_route)
            return trades_loss(logits, net(x_adv, "pgd"), y, cfg.beta), logits
        if attack is not None:
            x = attack.perturb(x, lambda xa: F.cross_entropy(net(xa), y, reduction="sum"))
        with torch.no_grad():
            feats = net.features(x)
        logits = net.head(feats)
        return F.cross_entropy(logits, y), logits

    settings = LoopSettings(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.momentum, "multistep",
                            cfg.milestones, seed=cfg.seed)
    try:
        return train_classifier([p for p in net.parameters() if p.requires_grad], images, labels, step_loss, settings,
                                device, precision, prepare=lambda x, g: crop_flip(x, cfg.crop_padding, g),
                                # linear modes keep the encoder (and its BN statistics) in eval mode
                                on_epoch_start=lambda: net.train(not linear), log=log,
                                title=f"fine-tune {cfg.mode}", quiet=quiet)
    finally:
        net.requires_grad_(True)


def _train_mode(cfg: FinetuneConfig, source: Pretrained, net: Classifier, subset: Any, classes: list[str],
                num_classes: int, recipe: Recipe, device: torch.device, tmp: Path, quiet: bool) -> dict[str, Any]:
    """Train one mode into the temporary directory ``tmp``; return its config.json record."""
    from rsslctl.nn.encoder import single_bn_state
    from rsslctl.runtime.checkpoint import atomic_write_text, nonfinite, save_tensors
    tmp.mkdir(parents=True)
    with open(tmp / "metrics.jsonl", "w") as log:
        summary = train(cfg, net, subset.images.to(device), subset.labels.to(device), device,
                        recipe.engine.precision, log, quiet)
    info = {"config": dataclasses.asdict(cfg), "source": source.origin, "backbone": source.backbone,
            "mean": list(source.mean), "std": list(source.std), "num_classes": num_classes,
            "classes": classes, "dual_bn_trained": net.body.dual_bn,
            "train_images": len(subset), "data": recipe.resolved["data"], "engine": recipe.resolved["engine"],
            "final": summary}
    weights = single_bn_state(net, "pgd")
    if nonfinite(weights):  # never save a diverged model as a result
        raise TrainingDiverged(f"fine-tuning {cfg.mode}: weights became non-finite ({nonfinite(weights)[0]}); "
                               "lower --lr; nothing was written for this mode")
    save_tensors(tmp / "model.safetensors", weights, {"rsslctl": info})
    atomic_write_text(tmp / "config.json", json.dumps(info, indent=2))
    return info


def run_finetune(source: Pretrained, recipe: Recipe, configs: tuple[FinetuneConfig, ...], out_dir: Path,
             force: bool = False, quiet: bool = False) -> dict[str, dict[str, Any]]:
    """Run each config; write <out_dir>/finetune/<MODE>/{model.safetensors, config.json, metrics.jsonl}."""
    import torch

    from rsslctl.base.console import console
    from rsslctl.eval.suite import forget_evaluations
    from rsslctl.run.build import load_train_split, setup_device
    from rsslctl.runtime import distributed
    from rsslctl.runtime.checkpoint import pid_alive
    from rsslctl.train.classify import balanced_subset, mode_dir
    out_dir = Path(out_dir)
    for c in configs:
        refuse_existing(mode_dir(out_dir, c.mode), "fine-tuning output", force)
    device = setup_device(recipe)  # under torchrun: every rank trains on its part of each minibatch, rank 0 writes
    train_data = load_train_split(recipe)
    if (train_data.labels < 0).any():
        raise UserError(f"data.train_split = '{recipe.data.train_split}' is unlabelled; fine-tuning needs labels")
    num_classes = len(train_data.classes)
    results = {}
    for cfg in configs:
        subset = train_data.subset(balanced_subset(train_data.labels, cfg.label_fraction, cfg.seed))
        torch.manual_seed(cfg.seed)  # the random-init baseline's weights
        net = source.net(num_classes, cfg.dual_bn and cfg.mode == "AFF").to(device)
        distributed.broadcast_buffers(net, parameters=True)  # every rank starts from rank 0's classifier
        if not distributed.is_main():  # the same training, nothing written
            summary = train(cfg, net, subset.images.to(device), subset.labels.to(device), device,
                            recipe.engine.precision)
            results[cfg.mode] = {"final": summary}
            continue
        final = mode_dir(out_dir, cfg.mode)
        tmp = final.with_name(f".{cfg.mode}.tmp-{os.getpid()}")
        for stale in final.parent.glob(f".{cfg.mode}.tmp-*"):  # left behind by a killed run (its process is gone)
            if not pid_alive(stale.name.rpartition("-")[2]):
                shutil.rmtree(stale, ignore_errors=True)
        try:
            info = _train_mode(cfg, source, net, subset, train_data.classes, num_classes, recipe, device, tmp, quiet)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            forget_evaluations(out_dir, cfg.mode)  # they measured the model just replaced
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        results[cfg.mode] = info
        if not quiet:
            console.print(f"{cfg.mode}: {cfg.epochs} epochs, lr {cfg.lr:g}, batch {cfg.batch_size} ({cfg.hp_source}); "
                          f"final loss {info['final']['loss']:.4f}, train accuracy "
                          f"{100 * info['final']['train_accuracy']:.2f} %")
    return results




@click.command("finetune", cls=LaunchCommand)
@click.argument("run_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--mode", type=click.Choice(["SLF", "ALF", "AFF", "ALL"]), default="ALL", show_default=True,
              help="Fine-tuning mode; ALL runs SLF, ALF and AFF from one immutable configuration.")
@click.option("--timm", "timm_model", help="External encoder: timm model name (with --weights).")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
              help="External encoder weights (.safetensors).")
@click.option("--cifar-stem/--no-cifar-stem", default=None,
              help="External ResNet: 3×3 stem without max-pool (default: from the file's metadata, else off).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (default RUN_DIR; required with --weights).")
@click.option("--data", "--dataset", "data", help="Downstream dataset (transfer), e.g. cifar10 after CIFAR-100 "
              "pretraining (default: the run's dataset).")
@click.option("--data-root", help="Data root of the downstream dataset.")
@click.option("--image-size", type=click.IntRange(8),
              help="Downstream image size (e.g. 32 for STL-10 cross-task, 96 self-task).")
@click.option("--pretraining", default="auto", show_default=True,
              help="Row of the fine-tuning hyper-parameter table (rows come from the installed methods, see "
                   "docs/methods.md; 'other' = generic defaults; auto: the row the run's method declares).")
@click.option("--epochs", type=click.IntRange(1), help="Epochs (default: hyper-parameter table, else 25).")
@click.option("--batch-size", type=click.IntRange(1), help="Batch size (default: hyper-parameter table).")
@click.option("--lr", type=float, help="Learning rate (default: hyper-parameter table).")
@click.option("--milestones", help="LR ×0.1 after these epochs, e.g. 15,20 (default: hyper-parameter table).")
@click.option("--weight-decay", type=float, help="SGD weight decay (default 2e-4).")
@click.option("--beta", type=float, help="TRADES β for AFF (default 6).")
@click.option("--train-eps", help="Training attack radius (default 8/255).")
@click.option("--train-step-size", help="Training attack step (default 2/255).")
@click.option("--train-steps", type=click.IntRange(1), help="Training attack iterations (default 10).")
@click.option("--train-attack",
              help="ALF's training attack plugin, e.g. fgsm (default: the recipe's evaluation.attack).")
@click.option("--random-init", is_flag=True, help="No-pretraining baseline: the architecture of RUN_DIR (or --timm "
              "MODEL) with random weights.")
@click.option("--label-fraction", type=float, help="Class-balanced seeded fraction of training labels, e.g. 0.01, 0.1.")
@click.option("--single-bn", is_flag=True, help="AFF on a dual-BN checkpoint: single-BN TRADES (reference --dualBN 0).")
@click.option("--seed", type=click.IntRange(0), help="Seed of the label subset, augmentation and attacks (default 0).")
@click.option("--evaluate/--no-evaluate", "then_evaluate", default=True, show_default=True,
              help="Run the evaluation suite afterwards.")
@SET
@click.option("--force", is_flag=True, help="Replace existing fine-tuning (and evaluation) outputs.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@suite_options
@launch_options
@user_errors
def finetune_command(run_dir: Path | None, mode: str, timm_model: str | None, weights: Path | None,
             cifar_stem: bool | None,
             out_dir: Path | None, data: str | None, data_root: str | None, image_size: int | None, pretraining: str,
             overrides: tuple[str, ...], force: bool, quiet: bool, as_json: bool, then_evaluate: bool,
             **kw: Any) -> None:
    """Fine-tune a pretrained encoder (SLF / ALF / AFF, see docs/methods.md) and evaluate it."""
    from rsslctl.adversary.attack import make_attack
    from rsslctl.eval.suite import evaluate_finetuned
    from rsslctl.runtime import distributed
    from rsslctl.train.classify import mode_dir, resolve_configs
    ranks = launch_spec(*(kw.pop(k) for k in ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint")))
    random_init, train_attack = kw.pop("random_init"), kw.pop("train_attack")
    if train_attack is not None:
        if mode in ("SLF", "AFF"):
            raise UserError(f"--train-attack: {mode} has no training attack of its own (ALF has; AFF uses TRADES); "
                            "drop the flag or use --mode ALF")
        make_attack(train_attack, "--train-attack", known_only=True)
    if random_init and weights is not None:
        raise UserError("--random-init trains from random weights; drop --weights (RUN_DIR or --timm MODEL gives the "
                        "architecture)")
    if random_init and run_dir is None and not timm_model:
        raise UserError("--random-init needs the architecture: pass RUN_DIR or --timm MODEL")
    if random_init and run_dir is None:
        if out_dir is None:
            raise UserError("--random-init --timm MODEL needs --out DIR for the results")
        source = random_source(timm_model, cifar_stem)
    elif (run_dir is None) == (weights is None):
        raise UserError("pass either RUN_DIR (a pretraining run) or --weights FILE.safetensors [--timm MODEL]")
    elif run_dir is not None:
        if not Path(run_dir).is_dir():
            raise UserError(f"{run_dir}: run directory not found")
        source = from_run(run_dir)
        if random_init:
            source = dataclasses.replace(source, random_init=True, origin=f"random init (architecture of {run_dir})")
    else:
        if out_dir is None:
            raise UserError("--weights needs --out DIR for the results")
        source = from_safetensors(weights, timm_model, cifar_stem)
    out_dir = Path(out_dir or run_dir)
    recipe = downstream_recipe(source.recipe_raw, data, data_root, image_size, list(overrides))
    train_keys = ("epochs", "batch_size", "lr", "weight_decay", "beta", "train_steps", "label_fraction", "seed")
    user: dict[str, Any] = {k: kw.pop(k) for k in train_keys}
    user["eps"] = parse_eps(kw.pop("train_eps"), "--train-eps") if kw.get("train_eps") else kw.pop("train_eps")
    user["step_size"] = (parse_eps(kw.pop("train_step_size"), "--train-step-size") if kw.get("train_step_size")
                         else kw.pop("train_step_size"))
    ms = kw.pop("milestones")
    try:
        user["milestones"] = tuple(int(m) for m in ms.split(",") if m.strip()) if ms is not None else None
    except ValueError:
        raise UserError(f"--milestones: expected epochs separated by commas, e.g. 15,20; got {ms!r}") from None
    user["dual_bn"] = False if kw.pop("single_bn") else None
    user["attack"] = train_attack or recipe.evaluation.attack
    user["clamp_start"] = recipe.evaluation.clamp_start
    row = source.pretraining if pretraining == "auto" else pretraining
    column = recipe.dataset.cls.hyperparameter_column(recipe.data.image_size)
    configs = resolve_configs(mode, finetune_rows(), row, column, user)
    suite = suite_from_flags(kw)  # validate evaluation flags before training
    if weights is not None:  # replacing a mode's output must never delete the file being fine-tuned
        for c in configs:
            target = mode_dir(out_dir, c.mode).resolve()
            if target in Path(weights).resolve().parents:
                raise UserError(f"--weights {weights}: lies inside {target}, which fine-tuning writes; move it or "
                                "choose another --out")
    if ranks is not None:  # everything above is checked once here, before any rank starts
        for c in configs:
            refuse_existing(mode_dir(out_dir, c.mode), "fine-tuning output", force)
        from rsslctl.run.validate import check_before_launch
        check_before_launch(recipe)  # the downstream data can be read, the engine fits the device
        return start_ranks(ranks, recipe.engine.join_timeout_s)
    # one fine-tuning (and its evaluation) per output directory at a time: a second one would replace the first's
    # mode directories while it reads them; refused in one line naming the holder, released when this one ends
    with finetune_lock(out_dir):
        run_finetune(source, recipe, configs, out_dir, force, quiet)
        if not distributed.is_main():  # under torchrun rank 0 alone evaluates (and writes) what the ranks trained
            return
        if then_evaluate:
            report = evaluate_finetuned(out_dir, [c.mode for c in configs], suite, list(overrides), force)
            show_report(report, out_dir, as_json)


def finetune_lock(out_dir: Path) -> contextlib.AbstractContextManager:
    """The advisory lock on ``<out_dir>/finetune`` (rank 0 only under torchrun: the other ranks write nothing)."""
    from rsslctl.runtime import distributed
    return RunLock(Path(out_dir) / "finetune", "fine-tuning") if distributed.is_main() else contextlib.nullcontext()
