"""FGSM (Goodfellow et al.) and FGSM-RS (Wong et al.): one gradient step, optionally from a random start."""
from __future__ import annotations

import dataclasses
from typing import Literal

from torch import Tensor

from rsslctl import hookimpl, Attack, Number, Objective, opt, projected_ascent, random_start


@dataclasses.dataclass
class FGSMOptions:
    eps: Number = opt(8 / 255, "radius of the ε-ball, e.g. '8/255'", min=0)
    step_size: Number = opt(0.0, "step size; 0 = ε (plain FGSM) or 1.25·ε with random_start (FGSM-RS)", min=0)
    norm: Literal["linf", "l2"] = opt("linf", "threat model")
    random_start: bool = opt(False, "FGSM-RS: start from a uniform random point in the ε-ball")


class FGSM(Attack):
    """Fast gradient sign method (one step), with the FGSM-RS random-start variant."""

    name = "fgsm"
    citation = ("@inproceedings{goodfellow2015fgsm, title={Explaining and Harnessing Adversarial Examples}, "
                "author={Goodfellow, Ian J. and Shlens, Jonathon and Szegedy, Christian}, booktitle={ICLR}, "
                "year={2015}}")
    Options = FGSMOptions

    def perturb(self, x: Tensor, objective: Objective) -> Tensor:
        o = self.options
        x = x.detach().float()
        step = o.step_size or (1.25 * o.eps if o.random_start else o.eps)
        x_adv = random_start(x, o.eps, o.norm).clamp(0.0, 1.0) if o.random_start else x
        return projected_ascent(x, x_adv, objective, step, 1, o.eps, o.norm)


@hookimpl
def rsslctl_attacks() -> list[type]:
    return [FGSM]
