"""Classifiers on top of an encoder, and the one supervised / adversarial / TRADES training loop that fine-tuning,
the linear probe of ``evaluate`` and any post-processing plugin use.

Fine-tuning protocol (the RobustSSL benchmark's, see docs/methods.md):

* SLF: encoder frozen in eval mode, zero-initialised linear head, clean cross-entropy.
* ALF: encoder frozen in eval mode, cross-entropy on PGD examples made against the current head.
* AFF: every parameter trained with TRADES (β = 6). With a dual-BN encoder the clean term uses the ``normal``
  BN route and the attack and KL term the ``pgd`` route.

Hyper-parameters come from one immutable ``FinetuneConfig`` per mode: defaults, then the row of the
hyper-parameter table the pretraining method declares (``Method.finetune_rows``), then the user's flags.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Literal, Mapping, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsslctl.adversary.attack import eval_mode, projected_ascent
from rsslctl.base import registry
from rsslctl.base.console import err_console, progress_bar
from rsslctl.base.errors import TrainingDiverged, UserError
from rsslctl.base.limits import MAX_BATCH, MAX_EPOCHS, MAX_SEED, MAX_STEPS, check_number
from rsslctl.base.options import validate
from rsslctl.method.base import FinetuneRows
from rsslctl.nn.encoder import Encoder, EncoderOptions
from rsslctl.nn.optim import LRSchedule
from rsslctl.run.build import autocast
from rsslctl.run.recipe import shipped_defaults
from rsslctl.runtime import distributed as dist
from rsslctl.runtime.seeding import derive_seed
from rsslctl.train.step import optimizer_step

#: the fine-tuning protocols: standard linear, adversarial linear, adversarial full fine-tuning
MODES = ("SLF", "ALF", "AFF")
# -- hyper-parameters ------------------------------------------------------------------------------------------------
def finetune_columns() -> tuple[str, ...]:
    """The columns of the fine-tuning hyper-parameter tables, in their positional layout: what the installed
    dataset plugins declare (``Dataset.finetune_columns``, ordered by ``finetune_order``, then size, largest first)."""
    found = set()
    for info in registry.registry().entries("dataset").values():
        cls = info[0].cls
        found |= {(cls.finetune_order, -size, title) for title, size in cls.finetune_columns.items()}
    titles: list[str] = []
    for _, _, title in sorted(found):
        if title not in titles:
            titles.append(title)
    return tuple(titles)


class TableCells(Mapping[str, dict[str, Any]]):
    """One mode's cells of a fine-tuning table, column title → settings. Cells given by position (``cells``) or for
    every column (``every_column``) are matched to the columns on first use: method plugins build their tables when
    they are imported, before the dataset plugins are known. ``table | {title: cell}`` replaces single columns."""

    def __init__(self, per_column: tuple | None, every: dict[str, Any] | None, common: dict[str, Any],
                 overrides: Mapping[str, dict[str, Any]] = MappingProxyType({})) -> None:
        self._per_column, self._every, self._common, self._overrides = per_column, every, common, dict(overrides)
        self._resolved: dict[str, dict[str, Any]] | None = None

    def _cells(self) -> dict[str, dict[str, Any]]:
        if self._resolved is None:
            out = {}
            if self._every is not None:
                out = {key: dict(self._every) for key in finetune_columns()}
            else:
                for key, cell in zip(finetune_columns(), self._per_column or ()):
                    if cell is not None:
                        out[key] = {"batch_size": cell[0], "lr": cell[1], **self._common,
                                    **(cell[2] if len(cell) > 2 else {})}
            self._resolved = {**out, **self._overrides}
        return self._resolved

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self._cells()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cells())

    def __len__(self) -> int:
        return len(self._cells())

    def __or__(self, other: Mapping[str, dict[str, Any]]) -> "TableCells":
        return TableCells(self._per_column, self._every, self._common, {**self._overrides, **other})

    def __repr__(self) -> str:
        return f"TableCells({dict(self)!r})"


def cells(*per_column: tuple | None, **common: Any) -> TableCells:
    """One table cell per column, in the tables' positional layout (``finetune_columns``, declared by the dataset
    plugins); a cell is (batch_size, lr[, extra settings]) or None (no entry); ``common`` goes into every cell."""
    return TableCells(per_column, None, common)


def every_column(**values: Any) -> TableCells:
    """The same cell in every column."""
    return TableCells(None, values, {})


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
    attack: str = ""  # ALF's training attack plugin (the recipe's evaluation.attack)
    clamp_start: bool = True  # ALF attack: clip its random start into [0, 1] (false = reference PGD)


USER_KEYS = tuple(f.name for f in dataclasses.fields(FinetuneConfig)
                  if f.name not in ("mode", "pretraining", "hp_source"))


def resolve_config(mode: str, rows: FinetuneRows, row: str, column: str,
                   user: Mapping[str, Any] = MappingProxyType({})) -> FinetuneConfig:
    """defaults → table cell (row, mode, column) → user values (None = not given). ``column`` '' = the dataset has
    no column of its own: the first is used and ``hp_source`` says so."""
    if mode not in MODES:
        raise UserError(f"--mode: {mode!r} is not one of {', '.join(MODES)}, ALL")
    if row not in rows and row != "other":
        raise UserError(f"--pretraining: unknown row {row!r}; choose from {', '.join([*rows, 'other'])}")
    unknown = set(user) - set(USER_KEYS)
    if unknown:
        raise ValueError(f"unknown fine-tuning settings {sorted(unknown)}")
    key = column or next(iter(finetune_columns()), "")
    cell = rows.get(row, {}).get(mode, {}).get(key)
    source = f"hyper-parameter table: {row} {mode} {key}" if cell else "defaults (no table entry)"
    if cell and not column:
        source += " column (the dataset has no column of its own)"
    values = {**(cell or {}), **{k: v for k, v in user.items() if v is not None}}
    values.setdefault("attack", shipped_defaults()["recipe"]["evaluation"]["attack"])
    if "milestones" in values:
        values["milestones"] = tuple(int(m) for m in values["milestones"])
    cfg = FinetuneConfig(mode=mode, pretraining=row, hp_source=source, **values)
    for name, lo, hi in (("epochs", 1, MAX_EPOCHS), ("batch-size", 1, MAX_BATCH), ("lr", 0, None),
                         ("label-fraction", 0, 1), ("train-steps", 1, MAX_STEPS), ("eps", 0, None),
                         ("step-size", 0, None), ("beta", 0, None), ("weight-decay", 0, None), ("seed", 0, MAX_SEED)):
        check_number(getattr(cfg, name.replace("-", "_")), f"--{name}", lo, hi)
    for m in cfg.milestones:
        check_number(m, "--milestones", 0, MAX_EPOCHS)
    if cfg.lr <= 0 or cfg.label_fraction <= 0:
        name = "lr" if cfg.lr <= 0 else "label-fraction"
        raise UserError(f"--{name}: {getattr(cfg, name.replace('-', '_'))} must be > 0")
    return cfg


def resolve_configs(mode: str, rows: FinetuneRows, row: str, column: str,
                    user: Mapping[str, Any] = MappingProxyType({})) -> tuple[FinetuneConfig, ...]:
    """One config per mode (``ALL`` = SLF, ALF, AFF), each resolved on its own from the same read-only inputs (the
    reference code mutates its arguments in place, so settings of one mode leak into the next; ours cannot)."""
    frozen = MappingProxyType(dict(user))
    modes = MODES if mode == "ALL" else (mode,)
    return tuple(resolve_config(m, rows, row, column, frozen) for m in modes)


# -- models and features ---------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """``features(x, route)`` of ``body`` (frozen or trained) followed by a linear head; takes pixels in [0, 1]."""

    def __init__(self, body: nn.Module, features: Callable[[Tensor, str], Tensor], num_features: int,
                 num_classes: int, route: str = "pgd") -> None:
        super().__init__()
        self.body, self.route = body, route
        self._features = features
        self.head = nn.Linear(num_features, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, x: Tensor, route: str | None = None) -> Tensor:
        return self._features(x, route or self.route).float()

    def forward(self, x: Tensor, route: str | None = None) -> Tensor:
        return self.head(self.features(x, route))


@torch.no_grad()
def extract_features(model: nn.Module, features: Callable[[Tensor], Tensor], images: Tensor, device: torch.device,
                     precision: str, batch: int = 512) -> Tensor:
    """``features(pixels in [0, 1])`` of uint8 images, batched, with ``model`` in eval mode (no augmentation)."""
    model.eval()
    out = []
    for chunk in images.split(batch):
        with autocast(device, precision):
            out.append(features(chunk.to(device).float().div_(255)).float())
    return torch.cat(out)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, device: torch.device, attack: Any = None,
             batch: int = 256) -> float:
    """Top-1 accuracy in eval mode (uint8 or [0, 1] float images); with ``attack``, on its adversarial examples (CE)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for xb, yb in zip(images.split(batch), labels.split(batch)):
        x, y = xb.to(device).float(), yb.to(device)
        if xb.dtype == torch.uint8:
            x.div_(255)
        if attack is not None:
            x = attack.perturb(x, lambda xa: F.cross_entropy(model(xa), y, reduction="sum"))  # noqa: B023 - called now
        with torch.no_grad():
            correct += (model(x).argmax(1) == y).sum()
    return float(correct) / len(labels)


# -- data ------------------------------------------------------------------------------------------------------------
def balanced_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Indices of a seeded, class-balanced subset of exactly round(fraction · N) labelled images: every class gets
    ⌊fraction · n_c⌋ or ⌈fraction · n_c⌉ images (largest remainders round up); the subset is sorted."""
    labels = labels.cpu()
    if fraction >= 1.0:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    share = counts.double() * fraction
    take = share.floor().long()
    extra = round(fraction * len(labels)) - int(take.sum())
    if extra > 0:  # largest remainder first; ties broken by a seeded shuffle
        order = torch.randperm(len(classes), generator=g)
        take[order[(share - take)[order].argsort(descending=True, stable=True)[:extra]]] += 1
    picked = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = (labels == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picked).sort().values


def crop_flip(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Fine-tuning augmentation, batched on the device: random crop with zero padding + horizontal flip."""
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


# -- losses ----------------------------------------------------------------------------------------------------------
def trades_adversary(model: nn.Module, x: Tensor, clean_route: str, eps: float, step_size: float, steps: int,
                     random_start: bool = True) -> Tensor:
    """TRADES inner maximisation in eval mode: L∞ steps on Σ KL(softmax f(x) ‖ softmax f(x')), starting from
    x + 0.001·N(0, 1) (not clipped, as TRADES and the benchmark; the first projection clips) or from x itself."""
    with eval_mode(model):
        with torch.no_grad():
            p_nat = F.softmax(model(x, clean_route).float(), 1)
        start = x + 0.001 * torch.randn_like(x) if random_start else x.detach()
        return projected_ascent(x, start, lambda xa: F.kl_div(F.log_softmax(model(xa, "pgd").float(), 1), p_nat,
                                                              reduction="sum"), step_size, steps, eps, "linf")


def trades_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """CE(f(x), y) + β · (1/N) · Σ_n KL(softmax f(x_n) ‖ softmax f(x'_n))."""
    kl = F.kl_div(F.log_softmax(logits_adv.float(), 1), F.softmax(logits_nat.float(), 1), reduction="sum")
    return F.cross_entropy(logits_nat.float(), y) + beta * kl / len(y)


# -- the training loop -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """SGD (momentum) settings of one classifier training run."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    momentum: float = 0.9
    schedule: Literal["multistep", "cosine"] = "multistep"  # multistep: ×0.1 after each milestone epoch
    milestones: tuple[int, ...] = ()
    drop_last: bool = False
    seed: int = 0


#: (inputs, labels) → (loss, logits) of one minibatch
StepLoss = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def train_classifier(params: list[Tensor], inputs: Tensor, labels: Tensor, step_loss: StepLoss, s: LoopSettings,
                     device: torch.device, precision: str = "fp32",
                     prepare: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                     on_epoch_start: Callable[[], None] | None = None, log: TextIO | None = None,
                     title: str = "train", quiet: bool = True) -> dict[str, float]:
    """Train ``params`` with SGD on (``inputs``, ``labels``) on ``device``; ``prepare`` augments a minibatch (with the
    loop's seeded generator). Metrics are read back once per epoch. Returns the last epoch's summary."""
    torch.manual_seed(s.seed if dist.rank() == 0 else derive_seed(s.seed, -dist.rank()))  # attacks: a stream per rank
    g = torch.Generator().manual_seed(s.seed)  # batches and their augmentation: the same on every rank
    opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    n = len(labels)
    per_epoch = n // s.batch_size if s.drop_last else math.ceil(n / s.batch_size)
    schedule = LRSchedule.per_batch(s.lr, s.epochs, per_epoch, s.schedule, s.milestones)
    summary: dict[str, float] = {}
    with progress_bar(quiet) as bar:
        task = bar.add_task(title, total=schedule.total_steps, info="")
        for epoch in range(1, s.epochs + 1):
            if on_epoch_start is not None:
                on_epoch_start()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            perm = torch.randperm(n, generator=g)[: per_epoch * s.batch_size if s.drop_last else n]
            for b, idx in enumerate(perm.to(device).split(s.batch_size)):
                lr = schedule.at(epoch, b)
                if len(idx) < dist.world_size():  # a last partial batch smaller than the number of ranks: skipped
                    continue
                x, y = inputs[idx], labels[idx]
                if prepare is not None:
                    x = prepare(x, g)
                (x, y), share = dist.split_batch(x, y)  # under torchrun: this rank's part of the minibatch
                loss, logits = optimizer_step(lambda x=x, y=y: step_loss(x, y), opt, params, device, precision, lr=lr,
                                              scale=share)
                loss_sum += loss * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                bar.update(task, advance=1)
            if dist.world_size() > 1:  # the epoch's figures over every rank's images
                totals = dist.mean_across_ranks(torch.stack([loss_sum, correct.float(), loss_sum.new_tensor(seen)]))
                loss_sum, correct, seen = totals[0] * dist.world_size(), totals[1] * dist.world_size(), round(
                    float(totals[2]) * dist.world_size())
            summary = {"epoch": epoch, "lr": lr, "loss": float(loss_sum) / seen,
                       "train_accuracy": float(correct) / seen}
            if not math.isfinite(summary["loss"]):
                raise TrainingDiverged(f"{title}: loss became {summary['loss']} in epoch {epoch}; lower the learning "
                                       "rate")
            bar.update(task, info=f"ep {epoch}/{s.epochs} loss {summary['loss']:.4f}")
            if not quiet and not sys.stdout.isatty():  # a batch job: one plain line per epoch
                err_console.print(f"{title}: epoch {epoch}/{s.epochs} mean loss {summary['loss']:.4f}, train accuracy "
                              f"{100 * summary['train_accuracy']:.2f} %", highlight=False)
            if log is not None:
                log.write(json.dumps(summary) + "\n")
    return summary


def train_linear_probe(features: Tensor, labels: Tensor, num_classes: int, epochs: int, lr: float, batch_size: int,
                       weight_decay: float, seed: int) -> nn.Linear:
    """SLF-style probe on fixed features: zero-initialised linear layer, SGD momentum 0.9, cosine LR, clean CE."""
    head = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)

    def step_loss(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = head(x)
        return F.cross_entropy(logits, y), logits

    train_classifier(list(head.parameters()), features, labels, step_loss,
                     LoopSettings(epochs, batch_size, lr, weight_decay, schedule="cosine", seed=seed), features.device)
    return head


# -- saved classifiers -----------------------------------------------------------------------------------------------
def encoder_classifier(backbone: nn.Module, mean: tuple, std: tuple, num_classes: int, dual_bn: bool) -> Classifier:
    """Normalisation + backbone (single or dual BN) + zero-initialised linear classifier; pixels in [0, 1]."""
    encoder = Encoder(backbone, EncoderOptions(dual_bn="on" if dual_bn else "off", head_layers=0, mean=tuple(mean),
                                               std=tuple(std)), dual_bn)
    return Classifier(encoder, encoder.features, encoder.num_features, num_classes, "pgd")


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
                        f"{show(unexpected)}; wrong shape {show(shape)}; check the model name, --cifar-stem and the "
                        "checkpoint")
    module.load_state_dict(dict(state))


def mode_dir(out_dir: Path, mode: str) -> Path:
    return Path(out_dir) / "finetune" / mode


def load_classifier(directory: Path, device: torch.device) -> tuple[Classifier, dict[str, Any]]:
    """A fine-tuned model (single BN, the ``pgd`` route of AFF) and its config.json."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory}: no fine-tuned model here; run `rsslctl finetune` first")
    from safetensors.torch import load as load_bytes

    from rsslctl.runtime.checkpoint import refuse_nonfinite
    weights = directory / "model.safetensors"
    try:
        info = json.loads((directory / "config.json").read_text())
        backbone, mean, std, classes = info["backbone"], info["mean"], info["std"], int(info["num_classes"])
        state = load_bytes(weights.read_bytes())
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        raise UserError(f"{directory}: damaged fine-tuning output ({type(exc).__name__}: {str(exc)[:120]}); run "
                        "`rsslctl finetune --force` again") from None
    except Exception as exc:  # noqa: BLE001 — safetensors' own error for a malformed file
        raise UserError(f"{weights}: not a readable safetensors file ({str(exc)[:120]})") from None
    refuse_nonfinite(state, str(weights))
    net = encoder_classifier(build_backbone(backbone), mean, std, classes, False)
    load_strict(net, state, str(weights))
    return net.to(device).eval(), info
