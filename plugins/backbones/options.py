"""Every built-in backbone's options and its lazy declaration, torch-free: listing, citing and validating a
recipe read them without importing the modules that implement the backbones (imported when a run needs them)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from rsslctl import Declared, hookimpl, opt


@dataclasses.dataclass
class TimmOptions:
    model: str = opt("resnet18", "timm model name (see timm.list_models())")
    cifar_stem: bool = opt(True, "ResNets: 3×3 stride-1 first conv and no max-pool, for 32×32 inputs")
    stem_width: int = opt(0, "with cifar_stem: channels of the stem (0 = timm's 64); the first stage width gives the "
                             "papers' CIFAR ResNet, with no 1×1 projection before the first block", min=0)
    model_kwargs: dict = opt({}, "extra keyword arguments for timm.create_model, e.g. {channels = [16, 32, 64, 128]}")
    weights: str = opt("", "optional safetensors file with initial backbone weights (timm key layout)")
    stem_init: Literal["kaiming", "pytorch"] = opt(
        "kaiming", "cifar_stem: init of the new 3×3 conv; kaiming = Kaiming-normal fan-out (ACL family), "
                   "pytorch = nn.Conv2d's default (EMP-SSL, CF-AMC-SSL)")
    zero_init_last: bool = opt(False, "start the last BN weight of each residual block at 0 (timm's default); "
                                      "false = 1, as every reference ResNet; ignored by models without the option")


DECLARED = [
    Declared("backbone", "timm", "timm_backbone",
             "timm.create_model(model, num_classes=0, **model_kwargs), optionally with the CIFAR stem.",
             TimmOptions,
             citation=("@misc{wightman2019timm, title={PyTorch Image Models}, author={Wightman, Ross}, "
                       "howpublished={https://github.com/huggingface/pytorch-image-models}, year={2019}}")),
]
#: name → BibTeX; the implementing classes read their ``citation`` from here
CITATION = {d.name: d.citation for d in DECLARED}


@hookimpl
def rsslctl_declarations() -> list[Declared]:
    return DECLARED
