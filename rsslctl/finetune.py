"""Robust fine-tuning (METHODS.md §6): SLF, ALF and AFF (TRADES) from a run directory or an external timm encoder.

* SLF: encoder frozen in eval mode, zero-initialised linear head, clean cross-entropy.
* ALF: encoder frozen in eval mode, cross-entropy on PGD-10 examples made against the current head.
* AFF: every parameter trained with TRADES (β = 6). With a dual-BN checkpoint the clean term uses the
  ``normal`` BN route and the attack and KL term the ``pgd`` route (§1.6); the saved model is the ``pgd`` route.

Every mode starts from the ``pgd`` route of a dual-BN checkpoint. Hyper-parameters come from one immutable
``FinetuneConfig`` per mode: defaults, then the per-method table of §6.3, then the user's flags. ``ALL`` resolves
the three configs independently from the same inputs, so nothing set for one mode leaks into another (the
reference code mutates its arguments in place and does leak; see §4.4).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tomllib
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import registry
from .attack import eval_mode, make_attack, projected_ascent
from .checkpoint import atomic_write_text, save_tensors
from .encoder import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderOptions, collapse_bn_state, single_bn_state
from .engine import autocast, load_train_split, select_device
from .errors import TrainingDiverged, UserError
from .options import validate
from .recipe import Recipe, resolve
from .runs import RECIPE_FILE
from .ui import console, progress_bar

MODES = ("SLF", "ALF", "AFF")
DATA_KEYS = ("cifar10", "cifar100", "stl96", "stl32")

# -- §6.3: per-method hyper-parameters -----------------------------------------------------------------------------


def _cols(c10: tuple | None, c100: tuple | None, stl96: tuple | None, stl32: tuple | None,
          **common: Any) -> dict[str, dict[str, Any]]:
    """One table cell per downstream column; a cell is (batch_size, lr[, extra settings])."""
    out = {}
    for key, cell in zip(DATA_KEYS, (c10, c100, stl96, stl32)):
        if cell is not None:
            out[key] = {"batch_size": cell[0], "lr": cell[1], **common, **(cell[2] if len(cell) > 2 else {})}
    return out


def _every(**values: Any) -> dict[str, dict[str, Any]]:
    return {key: dict(values) for key in DATA_KEYS}


_ACL_LF = _cols((512, 0.01), (512, 0.05), (512, 0.1), (128, 0.01), milestones=(10, 20))
_DYNACL_AFF = {**_every(batch_size=128, lr=0.1, milestones=(15, 20)),
               "stl96": {"batch_size": 128, "lr": 0.1, "milestones": (10, 20)}}
_BASELINE = {"SLF": _every(batch_size=512, lr=0.01, milestones=(15, 20)),
             "ALF": _every(batch_size=512, lr=0.01, milestones=(15, 20)),
             "AFF": _every(batch_size=128, lr=0.1, milestones=(15, 20))}
HYPERPARAMETERS: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]] = {
    "ACL": {"SLF": _ACL_LF, "ALF": _ACL_LF, "AFF": _every(batch_size=128, lr=0.1, epochs=100, milestones=(40, 60))},
    "DynACL": {"SLF": _ACL_LF, "ALF": _ACL_LF, "AFF": _DYNACL_AFF},
    "DynACL++": {"SLF": _ACL_LF, "ALF": _ACL_LF, "AFF": _DYNACL_AFF},
    "AdvCL": _BASELINE, "A-InfoNCE": _BASELINE, "DeACL": _BASELINE,
    # The ALF columns of the AIR rows do not restate the LR milestones; we use the SLF ones (10, 20).
    "ACL-AIR": {"SLF": _cols((512, 0.005), (512, 0.1), (512, 0.01), (128, 0.01), milestones=(10, 20)),
                "ALF": _cols((512, 0.01), (512, 0.1), (512, 0.01), (128, 0.01), milestones=(10, 20)),
                "AFF": _every(batch_size=128, lr=0.1, epochs=100, milestones=(40, 60))},
    "DynACL-AIR": {"SLF": _cols((512, 0.01, {"epochs": 5}), (512, 0.1), (512, 0.1), (128, 0.01), milestones=(10, 20)),
                   "ALF": _cols((512, 0.01), (512, 0.1), (128, 0.1), (128, 0.01), milestones=(10, 20)),
                   "AFF": _every(batch_size=128, lr=0.1, milestones=(15, 20))},
    "DynACL-AIR++": {"SLF": _cols((512, 0.01), (512, 0.1), (512, 0.1), None, milestones=(10, 20)),
                     "ALF": _cols((512, 0.01, {"epochs": 4}), (512, 0.1), (128, 0.1), None, milestones=(10, 20)),
                     "AFF": _every(batch_size=128, lr=0.1, milestones=(15, 20))},
}
#: our method plugin names → table rows (anything else uses the defaults: bs 128, lr 0.1, decay 15, 20)
METHOD_ROWS = {"acl": "ACL", "dynacl": "DynACL", "dynacl++": "DynACL++", "dynacl_pp": "DynACL++", "air": "DynACL-AIR",
               "acl_air": "ACL-AIR", "dynacl_air": "DynACL-AIR", "advcl": "AdvCL", "deacl": "DeACL"}
PRETRAINING_CHOICES = tuple(HYPERPARAMETERS) + ("other",)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything one fine-tuning mode uses; immutable, so one mode can never change another's settings."""

    mode: str
    pretraining: str = "other"
    hp_source: str = "defaults"
    epochs: int = 25
    batch_size: int = 128
    lr: float = 0.1
    milestones: tuple[int, ...] = (15, 20)
    momentum: float = 0.9
    weight_decay: float = 2e-4
    eps: float = 8 / 255
    step_size: float = 2 / 255
    train_steps: int = 10
    beta: float = 6.0
    dual_bn: bool = True
    label_fraction: float = 1.0
    crop_padding: int = 4
    seed: int = 0


USER_KEYS = tuple(f.name for f in dataclasses.fields(FinetuneConfig) if f.name not in ("mode", "pretraining", "hp_source"))


def data_key(dataset: str, image_size: int) -> str:
    """The §6.3 column for a downstream dataset; unknown datasets use the CIFAR-10 column."""
    if dataset == "stl10":
        return "stl96" if image_size >= 96 else "stl32"
    return dataset if dataset in DATA_KEYS else "cifar10"


def resolve_config(mode: str, pretraining: str, dataset: str, image_size: int,
                   user: Mapping[str, Any] = MappingProxyType({})) -> FinetuneConfig:
    """defaults → §6.3 table cell for (pretraining, mode, dataset) → user values (None = not given)."""
    if mode not in MODES:
        raise UserError(f"--mode: {mode!r} is not one of {', '.join(MODES)}, ALL")
    if pretraining not in PRETRAINING_CHOICES:
        raise UserError(f"--pretraining: unknown row {pretraining!r}; choose from {', '.join(PRETRAINING_CHOICES)}")
    unknown = set(user) - set(USER_KEYS)
    if unknown:
        raise ValueError(f"unknown fine-tuning settings {sorted(unknown)}")
    key = data_key(dataset, image_size)
    cell = HYPERPARAMETERS.get(pretraining, {}).get(mode, {}).get(key)
    source = f"METHODS.md §6.3 {pretraining} {mode} {key}" if cell else "defaults (no §6.3 entry)"
    if cell and key != dataset and dataset != "stl10":
        source += f" column (used for {dataset})"
    values = {**(cell or {}), **{k: v for k, v in user.items() if v is not None}}
    if "milestones" in values:
        values["milestones"] = tuple(int(m) for m in values["milestones"])
    cfg = FinetuneConfig(mode=mode, pretraining=pretraining, hp_source=source, **values)
    _check(cfg)
    return cfg


def resolve_configs(mode: str, pretraining: str, dataset: str, image_size: int,
                    user: Mapping[str, Any] = MappingProxyType({})) -> tuple[FinetuneConfig, ...]:
    """One config per mode (``ALL`` = SLF, ALF, AFF), each resolved on its own from the same read-only inputs."""
    frozen = MappingProxyType(dict(user))
    modes = MODES if mode == "ALL" else (mode,)
    return tuple(resolve_config(m, pretraining, dataset, image_size, frozen) for m in modes)


def _check(cfg: FinetuneConfig) -> None:
    for name, ok, rule in (("epochs", cfg.epochs >= 1, ">= 1"), ("batch-size", cfg.batch_size >= 1, ">= 1"),
                           ("lr", cfg.lr > 0, "> 0"), ("label-fraction", 0 < cfg.label_fraction <= 1, "in (0, 1]"),
                           ("train-steps", cfg.train_steps >= 1, ">= 1"), ("eps", cfg.eps >= 0, ">= 0"),
                           ("beta", cfg.beta >= 0, ">= 0"), ("weight-decay", cfg.weight_decay >= 0, ">= 0")):
        if not ok:
            raise UserError(f"--{name}: {getattr(cfg, name.replace('-', '_'))} must be {rule}")


# -- model ---------------------------------------------------------------------------------------------------------


class FinetuneNet(nn.Module):
    """Normalisation + backbone (single or dual BN) + zero-initialised linear classifier; pixels in [0, 1]."""

    def __init__(self, backbone: nn.Module, mean: tuple, std: tuple, num_classes: int, dual_bn: bool) -> None:
        super().__init__()
        opts = EncoderOptions(dual_bn="on" if dual_bn else "off", head_layers=0, mean=tuple(mean), std=tuple(std))
        self.encoder = Encoder(backbone, opts, dual_bn)
        self.fc = nn.Linear(self.encoder.num_features, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor, route: str = "pgd") -> Tensor:
        return self.fc(self.encoder.features(x, route).float())


def build_backbone(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a backbone from {"name", "options"} without loading any initial weights file."""
    cls = registry.get("backbone", spec["name"], "backbone.name")
    options = validate(cls.Options, dict(spec["options"]), "backbone")
    if hasattr(options, "weights"):
        options = dataclasses.replace(options, weights="")
    return cls(options).build()


def load_strict(module: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    """Load every tensor or fail with the keys that do not match (never drops weights silently)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" … ({len(keys)} in all)" if len(keys) > 4 else "") if keys else "none"
        raise UserError(f"{where}: weights do not match the model: missing {show(missing)}; unexpected "
                        f"{show(unexpected)}; wrong shape {show(shape)}; check the model name, --cifar-stem and the checkpoint")
    module.load_state_dict(dict(state))


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

    def net(self, num_classes: int, dual: bool) -> FinetuneNet:
        """Fresh classifier initialised from the ``pgd`` route (or both routes when ``dual``)."""
        dual = dual and self.dual_bn
        net = FinetuneNet(build_backbone(self.backbone), self.mean, self.std, num_classes, dual)
        state = self.state if dual or not self.dual_bn else collapse_bn_state(self.state, "pgd")
        load_strict(net.encoder.backbone, state, self.origin)
        return net


def from_run(run_dir: Path, overrides: list[str] = ()) -> Pretrained:
    """The newest checkpoint of a pretraining run (the encoder a method exports for evaluation)."""
    from .runs import load_run_recipe, load_trained_method
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir, overrides)
    method, ckpt, _ = load_trained_method(run_dir, recipe, torch.device("cpu"), "fine-tune")
    enc = method.eval_encoder()
    bb = recipe.resolved["backbone"]
    name = recipe.resolved["method"]["name"]
    return Pretrained({"name": bb["name"], "options": {k: v for k, v in bb.items() if k != "name"}},
                      {k: v.clone() for k, v in enc.backbone.state_dict().items()}, enc.dual_bn,
                      tuple(recipe.encoder.mean), tuple(recipe.encoder.std), METHOD_ROWS.get(name, "other"),
                      tomllib.loads((run_dir / RECIPE_FILE).read_text()), str(ckpt))


def from_safetensors(weights: Path, model: str | None, cifar_stem: bool | None) -> Pretrained:
    """An external timm backbone; metadata written by `rsslctl export` supplies defaults (model, stem, mean/std)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"--weights: file not found: {weights.resolve()}")
    try:
        with safe_open(str(weights), "pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(weights))
    except Exception as exc:  # not a safetensors file
        raise UserError(f"--weights: {weights} is not a readable safetensors file ({exc})") from None
    info = json.loads(meta.get("rsslctl", "{}"))
    bb = info.get("backbone", {})
    model = model or bb.get("model")
    if not model:
        raise UserError(f"--weights: {weights} does not say which model it holds; pass --timm MODEL")
    stem = cifar_stem if cifar_stem is not None else bool(bb.get("cifar_stem", False))
    kwargs = bb.get("model_kwargs", {}) if bb.get("model") == model else {}
    spec = {"name": "timm", "options": {"model": model, "cifar_stem": stem, "model_kwargs": kwargs}}
    return Pretrained(spec, state, False, tuple(info.get("mean", IMAGENET_MEAN)), tuple(info.get("std", IMAGENET_STD)),
                      "other", {}, str(weights))


def downstream_recipe(base: dict[str, Any], data: str | None, data_root: str | None, image_size: int | None,
                      overrides: list[str]) -> Recipe:
    """The run's recipe (or an empty one) with the downstream dataset swapped in for transfer."""
    raw = {k: dict(v) for k, v in base.items() if isinstance(v, dict)}
    table = raw.get("data", {})
    if data and data != table.get("name"):
        table = {k: table[k] for k in ("root", "download", "image_size") if k in table} | {"name": data}
    if data_root:
        table["root"] = data_root
    if image_size:
        table["image_size"] = image_size
    raw["data"] = table
    raw.setdefault("engine", {})
    return resolve(raw, overrides, "fine-tuning")


# -- data ----------------------------------------------------------------------------------------------------------


def balanced_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Indices of a seeded, class-balanced subset of exactly round(fraction · N) labelled images.

    Every class gets ⌊fraction · n_c⌋ or ⌈fraction · n_c⌉ images (largest remainders round up), so class
    proportions are kept; the subset is sorted.
    """
    labels = labels.cpu()
    if fraction >= 1.0:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    total = round(fraction * len(labels))
    share = counts.double() * fraction
    take = share.floor().long()
    extra = total - int(take.sum())
    if extra > 0:  # largest remainder first; ties broken by a seeded shuffle
        order = torch.randperm(len(classes), generator=g)
        rema = (share - take)[order]
        take[order[rema.argsort(descending=True, stable=True)[:extra]]] += 1
    picked = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = (labels == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picked).sort().values


def crop_flip(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """§6.1 train augmentation, batched on the device: random crop with zero padding + horizontal flip."""
    x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
    n, c, h, w = x.shape
    if padding:
        x = F.pad(x, (padding,) * 4)
        off = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device, non_blocking=True)
        rows = (off[0, :, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
        x = x.gather(2, rows)
        cols = (off[1, :, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
        x = x.gather(3, cols)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device, non_blocking=True).view(n, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


# -- training ------------------------------------------------------------------------------------------------------


def trades_adversary(net: FinetuneNet, x: Tensor, clean_route: str, cfg: FinetuneConfig) -> Tensor:
    """TRADES inner maximisation: L∞ steps on Σ KL(softmax f(x) ‖ softmax f(x')) from x + 0.001·N(0, 1), eval mode."""
    with eval_mode(net):
        with torch.no_grad():
            p_nat = F.softmax(net(x, clean_route), 1)
        start = (x + 0.001 * torch.randn_like(x)).clamp(0.0, 1.0)
        return projected_ascent(x, start, lambda xa: F.kl_div(F.log_softmax(net(xa, "pgd"), 1), p_nat, reduction="sum"),
                                cfg.step_size, cfg.train_steps, cfg.eps, "linf")


def trades_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """CE(f(x), y) + β · (1/N) · Σ_n KL(softmax f(x_n) ‖ softmax f(x'_n))."""
    kl = F.kl_div(F.log_softmax(logits_adv.float(), 1), F.softmax(logits_nat.float(), 1), reduction="sum")
    return F.cross_entropy(logits_nat.float(), y) + beta * kl / len(y)


def train(cfg: FinetuneConfig, net: FinetuneNet, images: Tensor, labels: Tensor, device: torch.device,
          precision: str = "fp32", log: Any = None, quiet: bool = True) -> dict[str, float]:
    """Fine-tune ``net`` in place with ``cfg``; images uint8 on ``device``. Returns the last epoch's metrics."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    clean_route = "normal" if net.encoder.dual_bn else "pgd"  # AFF, dual BN: clean TRADES term on the normal route
    linear = cfg.mode in ("SLF", "ALF")
    for p in net.encoder.parameters():
        p.requires_grad_(not linear)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    attack = (make_attack("pgd", "fine-tuning attack", eps=cfg.eps, step_size=cfg.step_size, steps=cfg.train_steps,
                          random_start=True) if cfg.mode == "ALF" else None)
    n = len(labels)
    steps = math.ceil(n / cfg.batch_size)
    summary: dict[str, float] = {}
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"fine-tune {cfg.mode}", total=cfg.epochs * steps, info="")
        for epoch in range(1, cfg.epochs + 1):
            lr = cfg.lr * 0.1 ** sum(m < epoch for m in cfg.milestones)  # MultiStepLR stepped once per epoch
            for group in opt.param_groups:
                group["lr"] = lr
            net.train(not linear)  # linear modes keep the encoder (and its BN statistics) in eval mode
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            for idx in torch.randperm(n, generator=g).to(device).split(cfg.batch_size):
                x, y = crop_flip(images[idx], cfg.crop_padding, g), labels[idx]
                with autocast(device, precision):
                    if cfg.mode == "AFF":
                        x_adv = trades_adversary(net, x, clean_route, cfg)
                        logits = net(x, clean_route)
                        loss = trades_loss(logits, net(x_adv, "pgd"), y, cfg.beta)
                    else:
                        if attack is not None:
                            x = attack.perturb(x, lambda xa: F.cross_entropy(net(xa), y, reduction="sum"))
                        with torch.no_grad():
                            feats = net.encoder.features(x, "pgd").float()
                        logits = net.fc(feats)
                        loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                bar.update(task, advance=1)
            summary = {"epoch": epoch, "lr": lr, "loss": float(loss_sum) / n, "train_accuracy": float(correct) / n}
            if not math.isfinite(summary["loss"]):
                raise TrainingDiverged(f"fine-tuning {cfg.mode}: loss became {summary['loss']} in epoch {epoch}; "
                                       "lower --lr")
            bar.update(task, info=f"ep {epoch}/{cfg.epochs} loss {summary['loss']:.4f}")
            if log is not None:
                log.write(json.dumps(summary) + "\n")
    for p in net.parameters():
        p.requires_grad_(True)
    return summary


def mode_dir(out_dir: Path, mode: str) -> Path:
    return Path(out_dir) / "finetune" / mode


def finetune(source: Pretrained, recipe: Recipe, configs: tuple[FinetuneConfig, ...], out_dir: Path,
             force: bool = False, quiet: bool = False) -> dict[str, dict[str, Any]]:
    """Run each config; write <out_dir>/finetune/<MODE>/{model.safetensors, config.json, metrics.jsonl}."""
    out_dir = Path(out_dir)
    taken = [mode_dir(out_dir, c.mode) for c in configs if mode_dir(out_dir, c.mode).exists()]
    if taken and not force:
        raise UserError(f"{taken[0]}: fine-tuning output already exists; pass --force to replace it")
    device = select_device(recipe.engine.device)
    if recipe.engine.threads:
        torch.set_num_threads(recipe.engine.threads)
    train_data = load_train_split(recipe)
    if (train_data.labels < 0).any():
        raise UserError(f"data.train_split = '{recipe.data.train_split}' is unlabelled; fine-tuning needs labels")
    num_classes = len(train_data.classes)
    results = {}
    for cfg in configs:
        subset = train_data.subset(balanced_subset(train_data.labels, cfg.label_fraction, cfg.seed))
        net = source.net(num_classes, cfg.dual_bn and cfg.mode == "AFF").to(device)
        final = mode_dir(out_dir, cfg.mode)
        tmp = final.with_name(f".{cfg.mode}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with open(tmp / "metrics.jsonl", "w") as log:
            summary = train(cfg, net, subset.images.to(device), subset.labels.to(device), device,
                            recipe.engine.precision, log, quiet)
        info = {"config": dataclasses.asdict(cfg), "source": source.origin, "backbone": source.backbone,
                "mean": list(source.mean), "std": list(source.std), "num_classes": num_classes,
                "classes": train_data.classes, "dual_bn_trained": net.encoder.dual_bn,
                "train_images": len(subset), "data": recipe.resolved["data"], "engine": recipe.resolved["engine"],
                "final": summary}
        save_tensors(tmp / "model.safetensors", single_bn_state(net, "pgd"), {"rsslctl": info})
        atomic_write_text(tmp / "config.json", json.dumps(info, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        results[cfg.mode] = info
        if not quiet:
            console.print(f"{cfg.mode}: {cfg.epochs} epochs, lr {cfg.lr:g}, batch {cfg.batch_size} ({cfg.hp_source}); "
                          f"final loss {summary['loss']:.4f}, train accuracy {100 * summary['train_accuracy']:.2f} %")
    return results


def load_finetuned(directory: Path, device: torch.device) -> tuple[FinetuneNet, dict[str, Any]]:
    """A fine-tuned model (single BN, the ``pgd`` route of AFF) and its config.json."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory}: no fine-tuned model here; run `rsslctl finetune` first")
    from safetensors.torch import load_file
    info = json.loads((directory / "config.json").read_text())
    net = FinetuneNet(build_backbone(info["backbone"]), info["mean"], info["std"], info["num_classes"], False)
    load_strict(net, load_file(str(directory / "model.safetensors")), str(directory / "model.safetensors"))
    return net.to(device).eval(), info
