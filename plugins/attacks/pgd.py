"""PGD (Madry et al.): iterated projected steepest ascent in an L∞ or L2 ε-ball."""
from __future__ import annotations

import dataclasses
from typing import Literal

from torch import Tensor

from rsslctl import hookimpl, Attack, Number, Objective, opt, projected_ascent, random_start


@dataclasses.dataclass
class PGDOptions:
    eps: Number = opt(8 / 255, "radius of the ε-ball, e.g. '8/255'", min=0)
    step_size: Number = opt(2 / 255, "step α per iteration", min=0)
    steps: int = opt(5, "number of iterations", min=1, max=100_000)
    norm: Literal["linf", "l2"] = opt("linf", "threat model")
    random_start: bool = opt(True, "start from a uniform random point in the ε-ball")
    clamp_start: bool = opt(True, "clip the random start into [0, 1] before the first step "
                                  "(false = reference ACL behaviour)")


class PGD(Attack):
    """Projected gradient descent, L∞ or L2, with optional uniform random start."""

    name = "pgd"
    citation = ("@inproceedings{madry2018pgd, "
                "title={Towards Deep Learning Models Resistant to Adversarial Attacks}, author={Madry, "
                "Aleksander and Makelov, Aleksandar and Schmidt, Ludwig and Tsipras, Dimitris and Vladu, "
                "Adrian}, booktitle={ICLR}, year={2018}}")
    Options = PGDOptions

    def perturb(self, x: Tensor, objective: Objective) -> Tensor:
        o = self.options
        x = x.detach().float()
        x_adv = random_start(x, o.eps, o.norm) if o.random_start else x.clone()
        if o.clamp_start:
            x_adv = x_adv.clamp(0.0, 1.0)
        return projected_ascent(x, x_adv, objective, o.step_size, o.steps, o.eps, o.norm)


@hookimpl
def rsslctl_attacks() -> list[type]:
    return [PGD]
