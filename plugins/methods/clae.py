"""CLAE (Ho & Vasconcelos, "Contrastive Learning with Adversarial Examples", NeurIPS 2020), SimCLR variant.

An adversarial example of view 1, made by FGSM on the contrastive loss between x₁ and x₁ + δ, is a harder positive
of x₁: L = NT-Xent(x₁, x₂) + α·NT-Xent(x₁, x₁ + δ) with α = 1, ε = 0.03. Adversarial images go through their own
BatchNorm (the ``pgd`` route of a dual-BN encoder, the paper's auxiliary BN). The MoCo variant needs a negative
queue and is not provided here.

Reference quirk behind a switch: the attack forward runs in train mode (``attack_bn = "train"``: batch statistics,
and the adversarial BN's running statistics move during the attack); by default the attack runs in eval mode.
"""
from __future__ import annotations

import contextlib

from torch import Tensor

from rsslctl import Method, eval_mode, hookimpl, multi_view, nt_xent, pair_rows
from rsslctl_plugins.methods.options import CITATION, CLAEOptions


def clae_loss(z1: Tensor, z2: Tensor, z1_adv: Tensor, temperature: float, alpha: float) -> Tensor:
    """L = NT-Xent(z₁, z₂) + α·NT-Xent(z₁, z̃₁) (Ho & Vasconcelos, NeurIPS 2020): the adversarial example of view 1
    is a second, harder positive of view 1."""
    return nt_xent(pair_rows(z1, z2), temperature) + alpha * nt_xent(pair_rows(z1, z1_adv), temperature)


class CLAE(Method):
    """CLAE: SimCLR plus an adversarial (FGSM/PGD) copy of view 1 as a harder positive, through its own BN."""

    name = "clae"
    citation = CITATION["clae"]
    Options = CLAEOptions
    needs_attack = True
    wants_dual_bn = True

    def adversarial(self, x1: Tensor) -> Tensor:
        """x̃₁ maximising NT-Xent(f(x₁), f(x̃₁)), both through the adversarial BN, f(x₁) fixed."""
        tau, enc = self.options.temperature, self.encoder
        mode = eval_mode(enc) if self.options.attack_bn == "eval" else contextlib.nullcontext()
        with mode:
            anchor = enc(x1, "pgd").detach()
            return self.attack.perturb(x1, lambda xa: nt_xent(pair_rows(anchor, enc(xa, "pgd")), tau))

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o, enc = self.options, self.encoder
        views = multi_view(images, self.augment, 2)
        adv = self.adversarial(views[0::2])
        z = enc(views, "normal")
        z1, z2 = z[0::2], z[1::2]
        loss_nat = nt_xent(pair_rows(z1, z2), o.temperature)
        loss = clae_loss(z1, z2, enc(adv, "pgd"), o.temperature, o.alpha)
        return loss, {"loss_nat": loss_nat.detach(), "loss_adv": (loss - loss_nat).detach()}


@hookimpl
def rsslctl_methods() -> list[type]:
    return [CLAE]
