"""What this package provides, declared lazily: torch-free, so `rsslctl --help`, `rsslctl plugins` and recipe
validation read it without importing the modules that implement the plugins (loaded when a run needs one)."""
from __future__ import annotations

import dataclasses

from rsslctl import Declared, Number, hookimpl, opt


@dataclasses.dataclass
class AlignUniformOptions:
    alpha: float = opt(2.0, "alignment exponent", min=1)
    t: float = opt(2.0, "uniformity temperature", min=0)
    weight: float = opt(1.0, "weight of the uniformity term", min=0)


@dataclasses.dataclass
class MIFGSMOptions:
    eps: Number = opt(8 / 255, "L∞ radius", min=0)
    steps: int = opt(5, "iterations", min=1)
    decay: float = opt(1.0, "momentum decay μ", min=0)


@dataclasses.dataclass
class KCenterOptions:
    size: int = opt(8, "images are compared at this size (pixels)", min=1)


@hookimpl
def rsslctl_declarations() -> list[Declared]:
    # (kind, name, the entry point in the `rsslctl` group that implements it, first docstring line, Options)
    return [
        Declared("method", "align_uniform", "align_uniform",
                 "Alignment-uniformity loss on two views (example third-party method).", AlignUniformOptions),
        Declared("attack", "mifgsm", "mifgsm", "MI-FGSM: L∞ sign steps on an L1-normalised momentum of the gradient "
                 "(example third-party attack).", MIFGSMOptions),
        Declared("coreset", "kcenter", "kcenter", "k-center greedy on down-sampled pixels: each pick is the image "
                 "farthest from those already picked.", KCenterOptions),
        Declared("command", "count-params", "count_params",
                 "Print the parameter count of a run's method and of its evaluated encoder."),
    ]
