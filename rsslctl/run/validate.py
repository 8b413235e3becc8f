"""The one validation pass of a run: every refusal ``pretrain`` makes before its first step that needs more than the
recipe alone (the training split's size, the device, the built model, the coreset schedule).

``recipe.resolve`` checks each table and the relations between options; ``check_run`` adds what needs the data and
the model. ``rsslctl recipe show`` calls it on its own (reading only the split's size, building the model on the
CPU); the ``Trainer`` calls it with the split and device it trains on, so both refuse the same recipes with the same
line. Nothing here trains.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from rsslctl.base.errors import UserError
from rsslctl.method.base import Method
from rsslctl.method.coreset import CoresetRun, method_target
from rsslctl.run.build import _read_split, build_method, load_train_split
from rsslctl.run.logs import check_logging
from rsslctl.run.recipe import Recipe
from rsslctl.runtime import distributed


@dataclasses.dataclass
class RunPlan:
    """What the checks established: the training images, minibatches per epoch, the method, the coreset schedule."""

    n_train: int
    steps_per_epoch: int
    method: Method
    coreset: CoresetRun | None


def train_size(recipe: Recipe) -> int:
    """Images of the recipe's training split after ``data.limit``; read without decoding where the dataset has a
    per-image reader, else by loading the split (which also applies the host-memory check of a resident split)."""
    source = _read_split(recipe, recipe.data.train_split, lambda ds, s: ds.source(s))
    n = len(source) if source is not None else len(load_train_split(recipe))
    return min(n, recipe.data.limit) if recipe.data.limit else n


def check_before_launch(recipe: Recipe) -> int:
    """What a launcher checks once before it starts the ranks of a verb that reads ``recipe``'s data: the engine
    options on the device the ranks will use and that the training split can be read; its size."""
    check_engine(recipe, planned_device(recipe))
    return train_size(recipe)


def planned_device(recipe: Recipe) -> torch.device:
    """The device a single-process run of the recipe would use, without joining a process group."""
    return distributed.setup(recipe.engine.device, recipe.engine.backend) if not distributed.launched() else \
        torch.device("cuda" if torch.cuda.is_available() and recipe.engine.device != "cpu" else "cpu")


def check_engine(recipe: Recipe, device: torch.device) -> None:
    """Engine options that depend on the device."""
    e = recipe.engine
    if e.cuda_graphs and not (e.compile and device.type == "cuda"):
        raise UserError("engine.cuda_graphs needs engine.compile = true and a CUDA device "
                        f"(device here: {device})")


def check_batch(recipe: Recipe, n_train: int, world: int | None = None) -> int:
    """Minibatches per epoch; refuses a global batch that does not divide by the ranks (``world``, default this
    run's) or exceeds the data."""
    batch = recipe.schedule.batch_size
    distributed.local_batch(batch, world=world)  # refuses a batch that does not divide by the number of ranks
    if n_train // batch == 0:
        raise UserError(f"schedule.batch_size = {batch} exceeds the {n_train} training images; "
                        "lower schedule.batch_size")
    return n_train // batch


def make_coreset(recipe: Recipe, n_train: int, method: Method) -> CoresetRun | None:
    """The [coreset] schedule (its checks: budget, validation split, selection file), or None when the run trains
    on the whole split every epoch."""
    r = recipe
    if r.selector.cls is None and not r.coreset.indices_file:
        return None
    selector = r.selector.build() if r.selector.cls else None
    if selector is not None and selector.needs_target:
        method_target(method)  # fail now, not after the warm-up
    return CoresetRun(r.coreset, selector, n_train, r.schedule.batch_size, r.schedule.epochs, r.run.seed,
                      r.dataset.name)


def check_run(recipe: Recipe, device: torch.device | None = None, n_train: int | None = None,
              build: Callable[[], Method] | None = None, world: int | None = None) -> RunPlan:
    """Every pre-training refusal of ``pretrain`` beyond the recipe's own: raise UserError (one line) on the first.

    The Trainer passes its device, the length of the split it opened and its way of building the method; left out,
    the device is the one a run here would use, the split's size is read from the dataset and the method is built
    on the CPU (its weights are thrown away). ``world``: the number of ranks the run will have (the launcher checks
    the recipe before it starts them), default this run's.
    """
    if recipe.logging is not None:
        check_logging(recipe.logging)
    device = planned_device(recipe) if device is None else device
    check_engine(recipe, device)
    n_train = train_size(recipe) if n_train is None else n_train
    steps = check_batch(recipe, n_train, world)
    method = build() if build is not None else build_method(recipe, torch.device("cpu"))
    coreset = make_coreset(recipe, n_train, method)
    if coreset is not None:  # the validation split is held out for the whole run
        steps = len(coreset.pool) // recipe.schedule.batch_size
    return RunPlan(n_train, steps, method, coreset)
