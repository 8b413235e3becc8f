"""The recipe's ``[encoder]``, ``[optimizer]`` and ``[schedule]`` options, torch-free (recipe validation reads them)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from rsslctl.base.limits import MAX_BATCH, MAX_EPOCHS
from rsslctl.base.options import opt

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class EncoderOptions:
    """The recipe's [encoder] section."""

    dual_bn: Literal["auto", "on", "off"] = opt("auto",
                                                "separate BN for clean/adversarial inputs; auto = what the method asks "
                                                "for")
    head_layers: int = opt(3, "projection-head linear layers (0 = no head)", min=0, max=8)
    head_hidden: int = opt(0, "hidden width of the head (0 = backbone feature width)", min=0)
    head_dim: int = opt(0, "output width of the head (0 = backbone feature width)", min=0)
    mean: tuple[float, float, float] = opt(IMAGENET_MEAN, "per-channel mean used inside the model")
    std: tuple[float, float, float] = opt(IMAGENET_STD, "per-channel std used inside the model")


@dataclasses.dataclass
class OptimizerOptions:
    """The recipe's [optimizer] section."""

    name: Literal["sgd", "adam", "adamw", "lars"] = opt("lars", "optimiser")
    lr: float = opt(5.0, "peak learning rate", min=0)
    momentum: float = opt(0.9, "SGD/LARS momentum", min=0, max=1)
    nesterov: bool = opt(False, "SGD Nesterov momentum")
    weight_decay: float = opt(1e-6, "weight decay (LARS applies it to every tensor, as the reference)", min=0)
    trust_coefficient: float = opt(1e-3, "LARS trust coefficient η", min=0)
    betas: tuple[float, float] = opt((0.9, 0.999), "Adam/AdamW betas, each in [0, 1)")


@dataclasses.dataclass
class ScheduleOptions:
    """The recipe's [schedule] section."""

    epochs: int = opt(100, "training epochs", min=1, max=MAX_EPOCHS)
    batch_size: int = opt(512, "images per step", min=2, max=MAX_BATCH)
    warmup_epochs: float = opt(10, "linear warm-up length in epochs", min=0, max=MAX_EPOCHS)
    kind: Literal["cosine", "constant", "exponential"] = opt(
        "cosine", "learning-rate schedule after warm-up; exponential: geometric decay lr·(min_lr/lr)^t over the "
                  "post-warm-up fraction t, i.e. ×(min_lr/lr)^(1/epochs) per epoch")
    min_lr: float = opt(1e-6, "final learning rate of the cosine or exponential schedule (absolute)", min=0)
    scheduler_step: Literal["before", "after"] = opt(
        "before", "where the reference steps its scheduler: before each iteration (ACL/AIR/RCS LambdaLR: iteration i "
                  "runs at the schedule's value at i+1) or after each optimizer step (EMP-SSL/CF-AMC-SSL "
                  "CosineAnnealingLR, official DynACL: iteration i runs at i)")
