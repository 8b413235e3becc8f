"""rsslctl: robust self-supervised learning toolkit.

This module is the **public plugin API**: everything a plugin package (a method, an attack, a dataset, a backbone, a
coreset selector or a CLI verb) may use is exported here and listed in ``__all__``. Everything else, the
subpackages ``rsslctl.base`` … ``rsslctl.cli`` included, is internal and may move between releases.

The API is versioned by ``__api_version__`` (MAJOR.MINOR): removing or changing a name in ``__all__`` bumps MAJOR,
adding one bumps MINOR. ``tests/test_public_api.py`` holds the list, so a change to it is always deliberate.

Names are loaded on first use (PEP 562), so ``import rsslctl`` and ``from rsslctl import hookimpl`` stay cheap: a
plugin module that only registers hooks does not import torch until one of its classes is used.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"
__api_version__ = "1.3"

#: Decorator for plugin hook implementations (the hooks are specified in ``rsslctl.base.hookspecs``).
hookimpl = pluggy.HookimplMarker("rsslctl")

#: Public name -> "module" or "module:attribute" it is defined in.
_EXPORTS: dict[str, str] = {
    # base: errors, options, limits, console, plugins
    "TrainingDiverged": "rsslctl.base.errors",
    "UserError": "rsslctl.base.errors",
    "as_dict": "rsslctl.base.options",
    "closest": "rsslctl.base.options",
    "Number": "rsslctl.base.options",
    "opt": "rsslctl.base.options",
    "parse_number": "rsslctl.base.options",
    "validate": "rsslctl.base.options",
    "check_allocation": "rsslctl.base.limits",
    "check_model_kwargs": "rsslctl.base.limits",
    "MAX_IMAGE_SIZE": "rsslctl.base.limits",
    "console": "rsslctl.base.console",
    "err_console": "rsslctl.base.console",
    "summary_table": "rsslctl.base.console",
    "get_plugin": "rsslctl.base.registry:get",
    "Declared": "rsslctl.base.registry",
    # runtime: processes and checkpoint files
    "all_gather_objects": "rsslctl.runtime.distributed",
    "rank": "rsslctl.runtime.distributed",
    "world_size": "rsslctl.runtime.distributed",
    "derive_seed": "rsslctl.runtime.seeding",
    "atomic_write_text": "rsslctl.base.files",
    "load_optimizer_tensors": "rsslctl.runtime.checkpoint",
    "optimizer_tensors": "rsslctl.runtime.checkpoint",
    "save_checkpoint": "rsslctl.runtime.checkpoint",
    "save_tensors": "rsslctl.runtime.checkpoint",
    # nn: networks, losses, optimisers
    "apply_cifar_stem": "rsslctl.nn.encoder",
    "Backbone": "rsslctl.nn.encoder",
    "Encoder": "rsslctl.nn.encoder",
    "fp32": "rsslctl.nn.losses",
    "global_similarities": "rsslctl.nn.losses",
    "nt_xent": "rsslctl.nn.losses",
    "pair_rows": "rsslctl.nn.losses",
    "positive_columns": "rsslctl.nn.losses",
    "self_mask": "rsslctl.nn.losses",
    "ema_update": "rsslctl.nn.momentum",
    "mlp_head": "rsslctl.nn.momentum",
    "momentum_copy": "rsslctl.nn.momentum",
    "MomentumSchedule": "rsslctl.nn.momentum",
    "make_optimizer": "rsslctl.nn.optim",
    # data: datasets and augmentation
    "Dataset": "rsslctl.data.dataset",
    "ImageData": "rsslctl.data.dataset",
    "ImageSource": "rsslctl.data.dataset",
    "FileSource": "rsslctl.data.dataset",
    "decode_file": "rsslctl.data.decode",
    "missing_data": "rsslctl.data.dataset",
    "safe_unpickle": "rsslctl.data.dataset",
    "HostRandom": "rsslctl.data.augment",
    "MIN_STRENGTH": "rsslctl.data.options",
    "multi_view": "rsslctl.data.augment",
    "npz_memmap": "rsslctl.data.stream",
    # adversary: attacks
    "Attack": "rsslctl.adversary.attack",
    "eval_mode": "rsslctl.adversary.attack",
    "input_grad": "rsslctl.adversary.attack",
    "loss_and_grad": "rsslctl.adversary.attack",
    "make_attack": "rsslctl.adversary.attack",
    "Objective": "rsslctl.adversary.attack",
    "project": "rsslctl.adversary.attack",
    "projected_ascent": "rsslctl.adversary.attack",
    "random_start": "rsslctl.adversary.attack",
    "AdversarialTraining": "rsslctl.adversary.training",
    "AdvTrainingOptions": "rsslctl.adversary.options",
    # method: methods, memory, coreset selection
    "Method": "rsslctl.method.base",
    "BankMethod": "rsslctl.method.memory",
    "NegativeQueue": "rsslctl.method.memory",
    "normalized_rows_grad": "rsslctl.method.memory",
    "softmax_logit_grad": "rsslctl.method.memory",
    "CoresetSelector": "rsslctl.method.coreset",
    "CoresetTarget": "rsslctl.method.coreset",
    "SelectionContext": "rsslctl.method.coreset",
    # run: recipes, run directories, assembly
    "load_raw": "rsslctl.run.recipe",
    "resolve": "rsslctl.run.recipe",
    "check_replaceable": "rsslctl.run.directory",
    "load_run_recipe": "rsslctl.run.directory",
    "MARKER": "rsslctl.run.directory",
    "prepare_run_dir": "rsslctl.run.directory",
    "RECIPE_FILE": "rsslctl.run.directory",
    "refuse_existing": "rsslctl.run.directory",
    "RunLock": "rsslctl.run.directory",
    "build_method": "rsslctl.run.build",
    "load_train_split": "rsslctl.run.build",
    "load_trained_method": "rsslctl.run.build",
    "plugin_versions": "rsslctl.run.build",
    "setup_device": "rsslctl.run.build",
    "FrozenTeacher": "rsslctl.run.teacher",
    # train: classifier training
    "cells": "rsslctl.train.classify",
    "Classifier": "rsslctl.train.classify",
    "crop_flip": "rsslctl.train.classify",
    "every_column": "rsslctl.train.classify",
    "extract_features": "rsslctl.train.classify",
    "LoopSettings": "rsslctl.train.classify",
    "MODES": "rsslctl.train.classify",
    "trades_adversary": "rsslctl.train.classify",
    "trades_loss": "rsslctl.train.classify",
    "train_classifier": "rsslctl.train.classify",
    "train_linear_probe": "rsslctl.train.classify",
    # cli: command plugins
    "user_errors": "rsslctl.cli.common",
}

__all__ = ["__api_version__", "__version__", "hookimpl", *_EXPORTS]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'rsslctl' has no attribute '{name}'")
    module, _, attribute = target.partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # static analysers and IDEs see the real definitions
    from rsslctl.adversary.attack import (
        Attack,
        Objective,
        eval_mode,
        input_grad,
        loss_and_grad,
        make_attack,
        project,
        projected_ascent,
        random_start,
    )
    from rsslctl.adversary.options import AdvTrainingOptions
    from rsslctl.adversary.training import AdversarialTraining
    from rsslctl.base.console import console, err_console, summary_table
    from rsslctl.base.errors import TrainingDiverged, UserError
    from rsslctl.base.files import atomic_write_text
    from rsslctl.base.limits import MAX_IMAGE_SIZE, check_allocation, check_model_kwargs
    from rsslctl.base.options import Number, as_dict, closest, opt, parse_number, validate
    from rsslctl.base.registry import Declared
    from rsslctl.base.registry import get as get_plugin
    from rsslctl.cli.common import user_errors
    from rsslctl.data.augment import HostRandom, multi_view
    from rsslctl.data.dataset import Dataset, FileSource, ImageData, ImageSource, missing_data, safe_unpickle
    from rsslctl.data.decode import decode_file
    from rsslctl.data.options import MIN_STRENGTH
    from rsslctl.data.stream import npz_memmap
    from rsslctl.method.base import Method
    from rsslctl.method.coreset import CoresetSelector, CoresetTarget, SelectionContext
    from rsslctl.method.memory import BankMethod, NegativeQueue, normalized_rows_grad, softmax_logit_grad
    from rsslctl.nn.encoder import Backbone, Encoder, apply_cifar_stem
    from rsslctl.nn.losses import fp32, global_similarities, nt_xent, pair_rows, positive_columns, self_mask
    from rsslctl.nn.momentum import MomentumSchedule, ema_update, mlp_head, momentum_copy
    from rsslctl.nn.optim import make_optimizer
    from rsslctl.run.build import build_method, load_train_split, load_trained_method, plugin_versions, setup_device
    from rsslctl.run.directory import (
        MARKER,
        RECIPE_FILE,
        RunLock,
        check_replaceable,
        load_run_recipe,
        prepare_run_dir,
        refuse_existing,
    )
    from rsslctl.run.recipe import load_raw, resolve
    from rsslctl.run.teacher import FrozenTeacher
    from rsslctl.runtime.checkpoint import load_optimizer_tensors, optimizer_tensors, save_checkpoint, save_tensors
    from rsslctl.runtime.distributed import all_gather_objects, rank, world_size
    from rsslctl.runtime.seeding import derive_seed
    from rsslctl.train.classify import (
        MODES,
        Classifier,
        LoopSettings,
        cells,
        crop_flip,
        every_column,
        extract_features,
        trades_adversary,
        trades_loss,
        train_classifier,
        train_linear_probe,
    )
