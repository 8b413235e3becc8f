"""The core keys of the recipe's ``[coreset]`` table and their checks, torch-free (recipe validation reads them)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from rsslctl.base.errors import UserError
from rsslctl.base.options import Number, opt


@dataclasses.dataclass
class CoresetOptions:
    """The core keys of the recipe's ``[coreset]`` table (``name`` picks the selector plugin, "none" = off)."""

    fraction: Number = opt(0.2,
                           "coreset size as a fraction of the training pool (floored to whole minibatches, at least "
                           "one)",
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
    precision: Literal["run", "fp32"] = opt(
        "run", "selection rounds (gradient bank, attacks, greedy search) under the run's autocast (run: bf16 when "
               "training is bf16), or always in fp32", earlier="fp32")


def check_options(o: CoresetOptions, selector: str, epochs: int, where: str) -> None:
    """Recipe-level consistency of the [coreset] table (called by recipe validation)."""
    if o.indices_file and selector != "none":
        raise UserError(f"{where}: both indices_file and selector '{selector}' given; set coreset.name = \"none\" to "
                        "train on the file's indices, or clear coreset.indices_file to select during training")
    if (o.indices_file or selector != "none") and o.warmup_epochs >= epochs:
        raise UserError(f"{where}.warmup_epochs = {o.warmup_epochs} leaves no coreset epochs in schedule.epochs = "
                        f"{epochs}; lower coreset.warmup_epochs")
