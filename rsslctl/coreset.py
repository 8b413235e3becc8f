"""Coreset selection: train on a small, informative subset chosen during training (RCS, METHODS.md §5).

Pieces shared by every selector live here; a selector plugin (``CoresetSelector``) only decides which indices.

* ``CoresetOptions``: the core keys of the recipe's ``[coreset]`` table (fraction, warm-up, re-selection period,
  a precomputed indices file, the unlabeled validation split).
* ``CoresetTarget``: what a method exposes for gradient-based selection — the linear layers whose gradients are
  sketched, features (frozen) and head (differentiated), per-image training losses. ``ContrastiveTarget`` serves
  the ACL family (projection-head linear layers, NT-Xent on clean and adversarial views); ``ClassifierTarget``
  serves supervised adversarial training (last linear layer, CE on PGD examples; SAT-RCS).
* Representational divergence (RD) between natural and adversarial outputs, the attack maximising it, and
  gradient sketches (each weight gradient averaged over output rows, each bias gradient averaged), computed per
  selection unit in shards that ``gather`` concatenates: the seam a multi-GPU engine all-gathers across ranks.
* ``CoresetRun``: what the engine asks each epoch (full pool during warm-up, re-selection every R epochs, or the
  fixed indices of a file), and the selection files written by ``rsslctl select-coreset``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attack import Attack, eval_mode
from .augment import multi_view
from .errors import UserError
from .losses import fp32, nt_xent
from .options import NoOptions, Number, opt

Divergence = Literal["minmax_kl", "softmax_kl"]


@dataclasses.dataclass
class CoresetOptions:
    """The core keys of the recipe's ``[coreset]`` table (``name`` picks the selector plugin, "none" = off)."""

    fraction: Number = opt(0.2, "coreset size as a fraction of the training pool (rounded to whole minibatches)",
                           min=1e-6, max=1.0)
    warmup_epochs: int = opt(0, "epochs trained on the whole pool before the first selection (RCS reference: 100)",
                             min=0)
    every: int = opt(20, "re-select every R epochs after the warm-up (RCS reference: 20)", min=1)
    validation_fraction: Number = opt(0.01, "share of the training split held out, unlabeled, as RCS's validation "
                                            "set (never trained on, never selected)", min=0.0, max=0.5)
    indices_file: str = opt("", "train on the indices in this file (written by `rsslctl select-coreset`) after "
                                "the warm-up, instead of selecting during training")
    lr_schedule: Literal["epochs", "steps"] = opt(
        "epochs", "how shortened coreset epochs advance the LR schedule: epochs = by fraction of epochs, as the RCS "
                  "reference; steps = over the optimizer steps the run actually takes")


def check_options(o: CoresetOptions, selector: str, epochs: int, where: str) -> None:
    """Recipe-level consistency of the [coreset] table (called by recipe validation)."""
    if o.indices_file and selector != "none":
        raise UserError(f"{where}: both indices_file and selector '{selector}' given; set coreset.name = \"none\" to "
                        "train on the file's indices, or clear coreset.indices_file to select during training")
    if (o.indices_file or selector != "none") and o.warmup_epochs >= epochs:
        raise UserError(f"{where}.warmup_epochs = {o.warmup_epochs} leaves no coreset epochs in schedule.epochs = "
                        f"{epochs}; lower coreset.warmup_epochs")


# -- method interface -----------------------------------------------------------------------------------------------
class CoresetTarget:
    """What gradient-based selection needs from a model. Only ``layers`` are differentiated; features are frozen."""

    #: BN routes of the natural and the adversarial input in the RD loss
    routes: ClassVar[tuple[str, str]] = ("normal", "normal")
    #: RD used when the selector asks for "auto"
    default_divergence: ClassVar[str] = "softmax_kl"

    def modules(self) -> list[nn.Module]:
        """Modules to put in eval mode and freeze during selection."""
        raise NotImplementedError

    def layers(self) -> list[nn.Linear]:
        """The linear layers whose gradients are sketched and updated by the greedy search."""
        raise NotImplementedError

    def features(self, x: Tensor, route: str) -> Tensor:
        """Frozen part of the model for pixels in [0, 1]."""
        raise NotImplementedError

    def head(self, f: Tensor, route: str) -> Tensor:
        """Differentiated part: features → outputs (projection or logits)."""
        raise NotImplementedError

    def training_losses(self, images: Tensor, labels: Tensor) -> Tensor:
        """Per-image training losses [N] for uint8 images, differentiable w.r.t. ``layers`` only; their mean is the
        minibatch loss the method would train on."""
        raise NotImplementedError

    def outputs(self, x: Tensor, route: str) -> Tensor:
        return self.head(self.features(x, route), route)


class ContrastiveTarget(CoresetTarget):
    """ACL family: projection-head linear layers; training loss ½[NT-Xent(clean views) + NT-Xent(adversarial views)]
    with the contrastive PGD of METHODS.md §1.4 (both views, pgd BN); RD between normal-route and pgd-route outputs."""

    routes = ("normal", "pgd")
    default_divergence = "minmax_kl"

    def __init__(self, encoder: nn.Module, attack: Attack, augment: Callable[[Tensor], Tensor],
                 temperature: float) -> None:
        self.encoder, self.attack, self.augment, self.temperature = encoder, attack, augment, temperature
        self._layers = [m for m in encoder.head.modules() if isinstance(m, nn.Linear)]
        if not self._layers:
            raise UserError("coreset: RCS differentiates the projection head, but the encoder has none; "
                            "set encoder.head_layers >= 1")

    def modules(self) -> list[nn.Module]:
        return [self.encoder]

    def layers(self) -> list[nn.Linear]:
        return self._layers

    def features(self, x: Tensor, route: str) -> Tensor:
        return self.encoder.features(x, route)

    def head(self, f: Tensor, route: str) -> Tensor:
        self.encoder.set_route(route)
        return self.encoder.head(f)

    def training_losses(self, images: Tensor, labels: Tensor) -> Tensor:
        tau = self.temperature
        views = multi_view(images, self.augment, 2)
        adv = self.attack.perturb(views, lambda xa: nt_xent(self.outputs(xa, "pgd"), tau))
        with torch.no_grad():
            f_nat, f_adv = self.features(views, "normal").float(), self.features(adv, "pgd").float()
        return 0.5 * (nt_xent(self.head(f_nat, "normal"), tau, reduction="per_image")
                      + nt_xent(self.head(f_adv, "pgd"), tau, reduction="per_image"))


class ClassifierTarget(CoresetTarget):
    """Supervised adversarial training (SAT-RCS): the classifier's last linear layer; training loss = CE on PGD
    examples (maximising CE); RD between the logits of natural and adversarial inputs."""

    def __init__(self, features: Callable[[Tensor], Tensor], last: nn.Linear, attack: Attack,
                 modules: list[nn.Module], augment: Callable[[Tensor], Tensor] | None = None) -> None:
        self._features, self.last, self.attack, self._modules = features, last, attack, modules
        self.augment = augment

    def modules(self) -> list[nn.Module]:
        return self._modules

    def layers(self) -> list[nn.Linear]:
        return [self.last]

    def features(self, x: Tensor, route: str) -> Tensor:
        return self._features(x)

    def head(self, f: Tensor, route: str) -> Tensor:
        return self.last(f)

    def training_losses(self, images: Tensor, labels: Tensor) -> Tensor:
        x = self.augment(images) if self.augment else images.float() / 255
        adv = self.attack.perturb(x, lambda xa: F.cross_entropy(self.outputs(xa, "normal").float(), labels,
                                                                reduction="sum"))
        with torch.no_grad():
            f = self.features(adv, "normal").float()
        with fp32(f):
            return F.cross_entropy(self.head(f, "normal").float(), labels, reduction="none")


# -- RD loss, attack, sketches --------------------------------------------------------------------------------------
def representational_divergence(nat: Tensor, adv: Tensor, kind: str) -> Tensor:
    """RD between natural and adversarial outputs [N, D] (METHODS.md §5.2/§5.4).

    minmax_kl (small-scale reference): each row min–max scaled to [0, 1], +1e-8, then the elementwise mean of
    p·(log p − log q) with p = adversarial, q = natural. softmax_kl (ImageNet / SAT-RCS): KL(softmax(nat) ‖
    softmax(adv)) summed over the D entries, averaged over rows.
    """
    with fp32(nat):
        nat, adv = nat.float(), adv.float()
        if kind == "minmax_kl":
            def scale(h: Tensor) -> Tensor:
                lo, hi = h.min(1, keepdim=True).values, h.max(1, keepdim=True).values
                return (h - lo) / (hi - lo).clamp_min(1e-12) + 1e-8
            p, q = scale(adv), scale(nat)
            return (p * (p.log() - q.log())).mean()
        log_p, log_q = F.log_softmax(nat, 1), F.log_softmax(adv, 1)
        return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def rd_attack(target: CoresetTarget, x: Tensor, attack: Attack, divergence: str) -> Tensor:
    """Adversarial inputs maximising RD against the (fixed) natural outputs; the model is in eval mode."""
    nat_route, adv_route = target.routes
    with torch.no_grad():
        nat = target.outputs(x, nat_route)
    return attack.perturb(x, lambda xa: representational_divergence(nat, target.outputs(xa, adv_route), divergence))


def sketch(grads: list[Tensor]) -> Tensor:
    """Compress per-unit gradients of linear layers: weight [k, out, in] → mean over out ([k, in]); bias [k, out] →
    its mean ([k, 1]); concatenated. The RCS approximation: 1537-d for the ACL head at 512-d (METHODS.md §5.2)."""
    return torch.cat([g.mean(1) if g.dim() == 3 else g.mean(1, keepdim=True) for g in grads], dim=1)


def layer_params(layers: list[nn.Linear]) -> list[Tensor]:
    return [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]


def unit_gradients(target: CoresetTarget, images: Tensor, labels: Tensor, unit: int) -> list[Tensor]:
    """Gradients of each unit's mean training loss w.r.t. the layers' parameters, batched: one list entry per
    parameter, shape [N/unit, *param]. Negatives in a contrastive loss come from the whole minibatch."""
    losses = target.training_losses(images, labels)
    n, k = losses.shape[0], losses.shape[0] // unit
    weights = torch.zeros(k, n, device=losses.device)
    weights.view(k, k, unit)[torch.arange(k), torch.arange(k)] = 1.0 / unit  # row j averages unit j's images
    params = layer_params(target.layers())
    if k == 1:
        return [g.unsqueeze(0) for g in torch.autograd.grad(losses, params, grad_outputs=weights[0])]
    return list(torch.autograd.grad(losses, params, grad_outputs=weights, is_grads_batched=True))


@dataclasses.dataclass
class GradientShard:
    """Per-unit gradient sketches (and optionally full flattened gradients) of some units of one round."""

    units: Tensor  # [k] unit ids (positions in the round's unit list)
    sketches: Tensor  # [k, D]
    full: Tensor | None  # [k, P]


def compute_gradients(target: CoresetTarget, images: Tensor, labels: Tensor, pool: Tensor, batch_size: int,
                      unit: int, seed: int, keep_full: bool, shard: tuple[int, int] = (0, 1)
                      ) -> tuple[Tensor, GradientShard]:
    """Cut the shuffled pool into minibatches of ``batch_size`` (the last partial one is dropped) and units of
    ``unit`` images; return (unit → image indices [U, unit], this shard's gradients).

    Minibatch b belongs to shard ``b % world``, and its randomness (augmentation, attack start) is seeded by
    (seed, b), so shards computed on different workers and gathered equal a single-worker computation.
    """
    rank, world = shard
    g = torch.Generator().manual_seed(seed)
    order = pool[torch.randperm(len(pool), generator=g)]
    n_batches = len(order) // batch_size
    units = order[: n_batches * batch_size].view(-1, unit)
    per_batch = batch_size // unit
    ids, sketches, full = [], [], []
    for b in range(rank, n_batches, world):
        torch.manual_seed(seed * 1_000_003 + b)
        idx = units[b * per_batch:(b + 1) * per_batch].flatten().to(images.device)
        grads = unit_gradients(target, images[idx], labels[idx], unit)
        ids.append(torch.arange(b * per_batch, (b + 1) * per_batch))
        sketches.append(sketch(grads).detach())
        if keep_full:
            full.append(torch.cat([gr.flatten(1) for gr in grads], 1).detach())
    empty = torch.zeros(0, dtype=torch.long)
    return units, GradientShard(torch.cat(ids) if ids else empty,
                                torch.cat(sketches) if sketches else torch.zeros(0),
                                torch.cat(full) if full else None)


def gather(shards: list[GradientShard]) -> GradientShard:
    """Merge shards (in a multi-GPU run: after an all-gather) into one, ordered by unit id."""
    units = torch.cat([s.units for s in shards])
    order = torch.argsort(units)
    full = [s.full for s in shards if s.full is not None]
    return GradientShard(units[order], torch.cat([s.sketches.cpu() for s in shards])[order],
                         torch.cat([f.cpu() for f in full])[order] if full else None)


@contextlib.contextmanager
def differentiate_only(target: CoresetTarget) -> Iterator[None]:
    """Eval mode everywhere, gradients only for the target's layers; their weights are restored afterwards
    (the greedy search's head steps are hypothetical)."""
    modules = target.modules()
    params = [p for m in modules for p in m.parameters()]
    was = [p.requires_grad for p in params]
    chosen = layer_params(target.layers())
    saved = [p.detach().clone() for p in chosen]
    try:
        for p in params:
            p.requires_grad_(False)
        for p in chosen:
            p.requires_grad_(True)
        with eval_mode(*modules):
            yield
    finally:
        with torch.no_grad():
            for p, s in zip(chosen, saved):
                p.copy_(s)
        for p, w in zip(params, was):
            p.requires_grad_(w)


# -- selector plugins -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SelectionContext:
    """Everything a selector may use. Indices refer to the training split (after ``data.limit``)."""

    images: Tensor  # uint8 [N, C, H, W], on the device
    labels: Tensor  # int64 [N], on the device (-1 = unlabeled)
    pool: Tensor  # candidate indices (CPU, long)
    validation: Tensor  # held-out indices (CPU, long), never selected
    batch_size: int  # training minibatch size; the budget is a multiple of it
    seed: int  # this round's seed
    method: Any = None  # the Method being trained (or None)

    def target(self) -> CoresetTarget:
        return method_target(self.method)


def method_target(method: Any) -> CoresetTarget:
    """The method's ``coreset_target()``, or a clear error for methods without one."""
    make = getattr(method, "coreset_target", None)
    target = make() if make else None
    if target is None:
        raise UserError(f"coreset: method '{getattr(method, 'name', '?')}' exposes no coreset target "
                        "(Method.coreset_target), so gradient-based selection cannot run; use coreset.name = "
                        "\"random\" or an ACL-family method")
    return target


class CoresetSelector:
    """Base class of coreset selector plugins: ``select(context, budget)`` returns ``budget`` pool indices."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: does the selector use the unlabeled validation split?
    needs_validation: ClassVar[bool] = False
    #: does the selector differentiate the model (needs ``Method.coreset_target``)?
    needs_target: ClassVar[bool] = False

    def __init__(self, options: Any) -> None:
        self.options = options

    def select(self, context: SelectionContext, budget: int) -> Tensor:
        """Return a sorted 1-D long tensor of ``budget`` distinct indices taken from ``context.pool``."""
        raise NotImplementedError


def split_validation(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(pool, validation): a random ``fraction`` of the N training indices held out (at least one if > 0)."""
    count = max(1, round(n * fraction)) if fraction > 0 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 17))
    return perm[count:].sort().values, perm[:count].sort().values


def budget_for(pool_size: int, fraction: float, batch_size: int) -> int:
    """Coreset size in images: the fraction of the pool rounded to whole minibatches, at least one."""
    return max(1, round(pool_size * fraction / batch_size)) * batch_size


def encoder_sha256(module: nn.Module) -> str:
    """sha256 over the module's state tensors (sorted keys, raw bytes): identifies the encoder a selection used."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- selection files ------------------------------------------------------------------------------------------------
def save_selection(path: Path, indices: Tensor, meta: dict[str, Any]) -> None:
    """Write indices + metadata atomically: safetensors (``indices`` tensor, metadata in the header) or JSON."""
    from .checkpoint import atomic_write_text, save_tensors
    path = Path(path)
    if path.suffix == ".json":
        atomic_write_text(path, json.dumps({**meta, "indices": indices.tolist()}, indent=1))
    else:
        save_tensors(path, {"indices": indices.to(torch.long)}, meta)


def load_selection(path: Path) -> tuple[Tensor, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"coreset.indices_file: {path} not found; write one with `rsslctl select-coreset`")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            return torch.tensor(data.pop("indices"), dtype=torch.long), data
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as fh:
            meta = {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}
            return fh.get_tensor("indices").to(torch.long), meta
    except Exception as exc:  # any malformed file is the user's input, not our bug
        raise UserError(f"coreset.indices_file: {path} is not a selection file ({type(exc).__name__}: {exc}); "
                        "write one with `rsslctl select-coreset`") from None


# -- in-loop schedule -----------------------------------------------------------------------------------------------
class CoresetRun:
    """Per-epoch training indices of a run with a coreset, and the selection state that checkpoints carry."""

    def __init__(self, options: CoresetOptions, selector: CoresetSelector | None, n_train: int, batch_size: int,
                 epochs: int, seed: int, dataset: str = "") -> None:
        self.o, self.selector, self.batch_size, self.seed = options, selector, batch_size, seed
        self.epochs = epochs
        self.indices: Tensor | None = None  # the current coreset
        self.history: list[dict[str, Any]] = []
        if selector is None:  # fixed file
            self.pool, self.validation = torch.arange(n_train), torch.zeros(0, dtype=torch.long)
            self.fixed, meta = load_selection(Path(options.indices_file))
            where = f"coreset.indices_file {options.indices_file}"
            if "train_size" in meta and int(meta["train_size"]) != n_train:
                raise UserError(f"{where}: selected from {meta['train_size']} training images, but this recipe has "
                                f"{n_train}; use the same data.name, train_split and limit as the selection")
            if meta.get("dataset") and dataset and meta["dataset"] != dataset:
                raise UserError(f"{where}: selected on dataset '{meta['dataset']}', but the recipe uses '{dataset}'")
            if self.fixed.dim() != 1 or len(self.fixed) == 0 or self.fixed.min() < 0 or self.fixed.max() >= n_train:
                raise UserError(f"{where}: indices must be a non-empty list in [0, {n_train})")
            if len(self.fixed.unique()) != len(self.fixed):
                raise UserError(f"{where}: indices are not distinct")
            if len(self.fixed) < batch_size:
                raise UserError(f"{where}: {len(self.fixed)} indices are fewer than schedule.batch_size = {batch_size}")
            self.budget = len(self.fixed)
        else:
            if selector.needs_validation and options.validation_fraction <= 0:
                raise UserError(f"coreset.validation_fraction = 0, but selector '{selector.name}' needs an unlabeled "
                                "validation set; set it to e.g. 0.01")
            self.pool, self.validation = split_validation(n_train, options.validation_fraction, seed)
            if len(self.pool) < batch_size:
                raise UserError(f"coreset: the {len(self.pool)} training images left after the validation split are "
                                f"fewer than schedule.batch_size = {batch_size}")
            self.budget = min(budget_for(len(self.pool), options.fraction, batch_size),
                              len(self.pool) // batch_size * batch_size)

    def epoch_steps(self) -> list[int]:
        """Minibatches in each epoch: the whole pool during the warm-up, the coreset afterwards."""
        full, core = len(self.pool) // self.batch_size, self.budget // self.batch_size
        return [full if e <= self.o.warmup_epochs else core for e in range(1, self.epochs + 1)]

    def due(self, epoch: int) -> bool:
        return (self.selector is not None and epoch > self.o.warmup_epochs
                and (epoch - self.o.warmup_epochs - 1) % self.o.every == 0)

    def active(self, epoch: int, images: Tensor, labels: Tensor, method: Any) -> Tensor:
        """Indices to train on in ``epoch`` (1-based), selecting first when a round is due."""
        if epoch <= self.o.warmup_epochs:
            return self.pool
        if self.selector is None:
            return self.fixed
        if self.due(epoch) or self.indices is None:
            self.indices = run_selector(self.selector, SelectionContext(
                images, labels, self.pool, self.validation, self.batch_size, self.seed * 1_000_003 + epoch, method),
                self.budget)
        return self.indices


def run_selector(selector: CoresetSelector, context: SelectionContext, budget: int) -> Tensor:
    """One selection round, with its randomness seeded by ``context.seed`` and isolated from training's RNG."""
    devices = [context.images.device] if context.images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(context.seed)
        out = selector.select(context, budget).to("cpu", torch.long)
    if len(out) != budget or len(out.unique()) != budget:
        raise RuntimeError(f"selector '{selector.name}' returned {len(out)} indices ({len(out.unique())} distinct), "
                           f"expected {budget}")
    return out.sort().values



# -- standalone selection (`rsslctl select-coreset`) -------------------------------------------------------------
def select_standalone(recipe_file: Path | None, run_dir: Path | None, fraction: float, out: Path,
                      overrides: list[str] = (), force: bool = False) -> dict[str, Any]:
    """Select a coreset once with the encoder of ``run_dir`` (its newest checkpoint) or, with a recipe, of the
    freshly initialised model; write indices + metadata to ``out``; return the metadata."""
    import time

    from . import __version__
    from .checkpoint import latest_checkpoint, load_checkpoint
    from .engine import build_method, load_train_split, select_device
    from .recipe import load_raw, resolve
    from .runs import RECIPE_FILE

    if (recipe_file is None) == (run_dir is None):
        raise UserError("select-coreset: pass either a RECIPE file or --run-dir RUN (whose current encoder is used)")
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction {fraction}: must be in (0, 1], e.g. --fraction 0.05")
    out = Path(out)
    if out.suffix not in (".safetensors", ".json"):
        raise UserError(f"--out {out}: use a .safetensors or .json file name")
    if out.exists() and not force:
        raise UserError(f"--out {out}: file exists; pass --force to replace it or choose another name")
    source = Path(run_dir) / RECIPE_FILE if run_dir else Path(recipe_file)
    if run_dir and not source.is_file():
        raise UserError(f"{run_dir}: not a run directory (no {RECIPE_FILE}); pass the directory `rsslctl pretrain` created")
    raw = load_raw(source)
    table = raw.get("coreset", {}) if isinstance(raw.get("coreset"), dict) else {}
    # this command selects once: no warm-up, no file to consume; the recipe's selector (RCS if none) does the work
    fixed = [] if table.get("name", "none") != "none" else ["coreset.name=rcs"]
    recipe = resolve(raw, fixed + ['coreset.indices_file=""', "coreset.warmup_epochs=0", *overrides,
                                   f"coreset.fraction={fraction!r}"], str(source))
    device = select_device(recipe.engine.device)
    torch.manual_seed(recipe.run.seed)
    method = build_method(recipe, device)
    ckpt, epoch = None, 0
    if run_dir:
        ckpt = latest_checkpoint(Path(run_dir))
        if ckpt is None:
            raise UserError(f"{run_dir}: no checkpoint yet, so there is no encoder to select with; pretrain first "
                            "(or pass the RECIPE to select with the untrained model)")
        state, _, meta = load_checkpoint(ckpt)
        method.load_state_dict(state)
        epoch = int(meta["epoch"])
    train = load_train_split(recipe)
    selector = recipe.plugin_cls["coreset"](recipe.plugin["coreset"])
    bs = recipe.schedule.batch_size
    plan = CoresetRun(recipe.coreset, selector, len(train), bs, recipe.schedule.epochs, recipe.run.seed)
    seed = recipe.run.seed * 1_000_003 + epoch + 1
    t0 = time.perf_counter()
    indices = run_selector(selector, SelectionContext(train.images.to(device), train.labels.to(device), plan.pool,
                                                      plan.validation, bs, seed, method), plan.budget)
    meta = {"format": "rsslctl-coreset/1", "selector": selector.name, "fraction": fraction, "size": len(indices),
            "seed": recipe.run.seed, "selection_seed": seed, "options": recipe.resolved["coreset"],
            "encoder_sha256": encoder_sha256(method.eval_encoder()), "source": str(run_dir or recipe_file),
            "checkpoint": str(ckpt) if ckpt else None, "epoch": epoch, "dataset": recipe.resolved["data"]["name"],
            "train_split": recipe.data.train_split, "limit": recipe.data.limit, "train_size": len(train),
            "pool_size": len(plan.pool), "validation_size": len(plan.validation), "batch_size": bs,
            "seconds": time.perf_counter() - t0, "rsslctl": __version__}
    save_selection(out, indices, meta)
    return meta
