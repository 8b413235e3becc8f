"""Coreset selection contract: train on a small, informative subset chosen during training.

What every selector shares lives here; a selector plugin (``CoresetSelector``) only decides which indices, and the
selection science (e.g. RCS's gradient matching) lives in its plugin.

* ``CoresetOptions``: the core keys of the recipe's ``[coreset]`` table (fraction, warm-up, re-selection period,
  a precomputed indices file, the unlabeled validation split).
* ``CoresetTarget``: what a method exposes for gradient-based selection — the linear layers whose gradients are
  used, features (frozen) and head (differentiated), per-image training losses. Methods implement it beside
  their loss (``Method.coreset_target``).
* ``CoresetRun``: what the engine asks each epoch (full pool during warm-up, re-selection every R epochs, or the
  fixed indices of a file), and the selection files written by ``rsslctl select-coreset``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rsslctl.base.errors import UserError
from rsslctl.base.options import Plugin
from rsslctl.method.options import CoresetOptions, check_options  # noqa: F401 (re-exported)
from rsslctl.runtime.checkpoint import atomic_write_text, save_tensors
from rsslctl.runtime.seeding import derive_seed


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
    #: autocast dtype the round runs under (``run_selector`` enters it), None = fp32
    autocast_dtype: torch.dtype | None = None

    def target(self) -> CoresetTarget:
        return method_target(self.method)


def method_target(method: Any) -> CoresetTarget:
    """The method's ``coreset_target()``, or a clear error for methods without one."""
    target = method.coreset_target() if method is not None else None
    if target is None:
        raise UserError(f"coreset: method '{getattr(method, 'name', '?')}' exposes no coreset target "
                        "(Method.coreset_target), so gradient-based selection cannot run; use coreset.name = "
                        "\"random\" or an ACL-family method")
    return target


class CoresetSelector(Plugin):
    """Base class of coreset selector plugins: ``select(context, budget)`` returns ``budget`` pool indices."""
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
    """Coreset size in images: the fraction of the pool floored to whole minibatches (as the RCS reference), at
    least one minibatch."""
    return max(1, math.floor(pool_size * fraction / batch_size)) * batch_size


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
        self.history: list[dict[str, Any]] = []  # one record per selection round (epoch, seconds, precision)
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

    def active(self, epoch: int, images: Tensor, labels: Tensor, method: Any, reselect: bool = True,
               autocast_dtype: torch.dtype | None = None) -> Tensor:
        """Indices to train on in ``epoch`` (1-based), selecting first when a round is due (and ``reselect``:
        resumed inside an epoch, the restored coreset stands). ``autocast_dtype``: the training step's (None =
        fp32); the round uses it unless ``coreset.precision = "fp32"``."""
        if epoch <= self.o.warmup_epochs:
            return self.pool
        if self.selector is None:
            return self.fixed
        if (self.due(epoch) and reselect) or self.indices is None:
            dtype = autocast_dtype if self.o.precision == "run" else None
            t0 = time.perf_counter()
            self.indices = run_selector(self.selector, SelectionContext(
                images, labels, self.pool, self.validation, self.batch_size, derive_seed(self.seed, epoch), method,
                dtype), self.budget)
            self.history.append({"epoch": epoch, "seconds": time.perf_counter() - t0, "images": self.budget,
                                 "pool": len(self.pool), "precision": precision_name(dtype)})
        return self.indices


def precision_name(dtype: torch.dtype | None) -> str:
    """How a selection round computed: 'bf16 autocast' (or another autocast dtype) or 'fp32'."""
    return "fp32" if dtype is None else f"{str(dtype).removeprefix('torch.').replace('bfloat16', 'bf16')} autocast"


def run_selector(selector: CoresetSelector, context: SelectionContext, budget: int) -> Tensor:
    """One selection round, with its randomness seeded by ``context.seed`` and isolated from training's RNG."""
    device = context.images.device
    devices = [device] if device.type == "cuda" else []
    amp = (torch.autocast(device.type, dtype=context.autocast_dtype) if context.autocast_dtype is not None
           else contextlib.nullcontext())
    with torch.random.fork_rng(devices=devices), amp:
        torch.manual_seed(context.seed)
        out = selector.select(context, budget).to("cpu", torch.long)
    if len(out) != budget or len(out.unique()) != budget:
        raise RuntimeError(f"selector '{selector.name}' returned {len(out)} indices ({len(out.unique())} distinct), "
                           f"expected {budget}")
    return out.sort().values
