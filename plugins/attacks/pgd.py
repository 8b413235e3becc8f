"""PGD (Madry et al.): iterated projected steepest ascent in an L∞ or L2 ε-ball."""
from __future__ import annotations

from torch import Tensor

from rsslctl import Attack, Objective, hookimpl, projected_ascent, random_start
from rsslctl_plugins.attacks.options import CITATION, PGDOptions


class PGD(Attack):
    """Projected gradient descent, L∞ or L2, with optional uniform random start."""

    name = "pgd"
    citation = CITATION["pgd"]
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
