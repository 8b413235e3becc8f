"""FGSM (Goodfellow et al.) and FGSM-RS (Wong et al.): one gradient step, optionally from a random start."""
from __future__ import annotations

from torch import Tensor

from rsslctl import Attack, Objective, hookimpl, projected_ascent, random_start
from rsslctl_plugins.attacks.options import CITATION, FGSMOptions


class FGSM(Attack):
    """Fast gradient sign method (one step), with the FGSM-RS random-start variant."""

    name = "fgsm"
    citation = CITATION["fgsm"]
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
