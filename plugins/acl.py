"""ACL (Jiang et al., NeurIPS 2020): adversarial contrastive learning, dual-stream by default."""
from __future__ import annotations

import dataclasses
from typing import Literal

from torch import Tensor

from rsslctl import hookimpl
from rsslctl.attack import eval_mode
from rsslctl.augment import multi_view
from rsslctl.coreset import ContrastiveTarget
from rsslctl.losses import nt_xent, pair_rows
from rsslctl.method import Method
from rsslctl.options import opt


@dataclasses.dataclass
class ACLOptions:
    variant: Literal["ds", "a2a", "a2s"] = opt("ds", "ds: clean pair (normal BN) + adversarial pair (pgd BN); "
                                                     "a2a: adversarial pair only; a2s: adversarial view vs clean view")
    weight: float = opt(0.0, "ω in ½[(1−ω)·L_nat + (1+ω)·L_adv] (ds only)", min=-1, max=1)
    temperature: float = opt(0.5, "NT-Xent temperature τ", min=1e-3)


class ACL(Method):
    """ACL: contrastive PGD on the views (eval mode, pgd BN), NT-Xent on clean and adversarial pairs."""

    name = "acl"
    Options = ACLOptions
    needs_attack = True
    wants_dual_bn = True

    def adversarial_views(self, views: Tensor) -> Tensor:
        """Attack both views jointly (A2A/DS) or only the even ones (A2S), maximising NT-Xent (METHODS.md §1.4)."""
        tau, enc = self.options.temperature, self.encoder
        with eval_mode(enc):
            if self.options.variant == "a2s":
                clean_odd = enc(views[1::2], "normal").detach()
                return self.attack.perturb(views[0::2], lambda xa: nt_xent(pair_rows(enc(xa, "pgd"), clean_odd), tau))
            return self.attack.perturb(views, lambda xa: nt_xent(enc(xa, "pgd"), tau))

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o, enc = self.options, self.encoder
        views = multi_view(images, self.augment, 2)
        adv = self.adversarial_views(views)
        if o.variant == "a2s":
            loss = nt_xent(pair_rows(enc(adv, "pgd"), enc(views[1::2], "normal")), o.temperature)
            return loss, {"loss_adv": loss.detach()}
        loss_adv = nt_xent(enc(adv, "pgd"), o.temperature)
        if o.variant == "a2a":
            return loss_adv, {"loss_adv": loss_adv.detach()}
        loss_nat = nt_xent(enc(views, "normal"), o.temperature)
        loss = 0.5 * ((1 - o.weight) * loss_nat + (1 + o.weight) * loss_adv)
        return loss, {"loss_nat": loss_nat.detach(), "loss_adv": loss_adv.detach()}

    def coreset_target(self) -> ContrastiveTarget:
        """RCS differentiates the projection head's linear layers with the plain ACL loss (any variant, §5.2)."""
        return ContrastiveTarget(self.encoder, self.attack, self.augment, self.options.temperature)


@hookimpl
def rsslctl_methods() -> list[type]:
    return [ACL]
