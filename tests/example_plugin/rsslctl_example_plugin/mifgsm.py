"""Momentum iterative FGSM (Dong et al., CVPR 2018) as a one-file rsslctl attack plugin."""
from __future__ import annotations

import torch
from torch import Tensor

from rsslctl import Attack, Objective, hookimpl, input_grad, project
from rsslctl_example_plugin.declared import MIFGSMOptions


class MIFGSM(Attack):
    """MI-FGSM: L∞ sign steps on an L1-normalised momentum of the gradient (example third-party attack)."""

    name = "mifgsm"
    Options = MIFGSMOptions

    def perturb(self, x: Tensor, objective: Objective) -> Tensor:
        o = self.options
        x = x.detach().float()
        x_adv, momentum = x.clone(), torch.zeros_like(x)
        for _ in range(o.steps):
            _, grad = input_grad(objective, x_adv)
            momentum = o.decay * momentum + grad / grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x_adv = project(x, x_adv + (o.eps / o.steps) * momentum.sign(), o.eps, "linf")
        return x_adv.detach()


@hookimpl
def rsslctl_attacks() -> list[type]:
    return [MIFGSM]
