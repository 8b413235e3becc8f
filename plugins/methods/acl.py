"""ACL (Jiang et al., NeurIPS 2020): adversarial contrastive learning, dual-stream by default."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from rsslctl import (
    Attack,
    CoresetTarget,
    Method,
    UserError,
    cells,
    eval_mode,
    every_column,
    hookimpl,
    multi_view,
    nt_xent,
    pair_rows,
)
from rsslctl_plugins.methods.options import CITATION, ACLOptions

#: SLF/ALF cells of the ACL-family rows of the RobustSSL benchmark's fine-tuning table
LINEAR_CELLS = cells((512, 0.01), (512, 0.05), (512, 0.1), (128, 0.01), milestones=(10, 20))


class ContrastiveTarget(CoresetTarget):
    """ACL family: projection-head linear layers; training loss ½[NT-Xent(clean views) + NT-Xent(adversarial views)]
    with the contrastive PGD of ACL (both views, pgd BN); RD between normal-route and pgd-route outputs."""

    routes = ("normal", "pgd")
    default_divergence = "minmax_kl"

    def __init__(self, encoder: nn.Module, attack: Attack, augment: Callable[[Tensor], Tensor],
                 temperature: float) -> None:
        self.encoder, self.attack, self.augment, self.temperature = encoder, attack, augment, temperature
        self._layers = [m for m in encoder.head.modules() if isinstance(m, nn.Linear)]
        if not self._layers:
            raise UserError("coreset: RCS differentiates the projection head, but the encoder has none; "
                            "set encoder.head_layers >= 1")

    def modules(self) -> list[nn.Module]:
        return [self.encoder]

    def layers(self) -> list[nn.Linear]:
        return self._layers

    def features(self, x: Tensor, route: str) -> Tensor:
        return self.encoder.features(x, route)

    def head(self, f: Tensor, route: str) -> Tensor:
        self.encoder.set_route(route)
        return self.encoder.head(f)

    def training_losses(self, images: Tensor, labels: Tensor) -> Tensor:
        tau = self.temperature
        views = multi_view(images, self.augment, 2)
        adv = self.attack.perturb(views, lambda xa: nt_xent(self.outputs(xa, "pgd"), tau))
        with torch.no_grad():
            f_nat, f_adv = self.features(views, "normal").float(), self.features(adv, "pgd").float()
        return 0.5 * (nt_xent(self.head(f_nat, "normal"), tau, reduction="per_image")
                      + nt_xent(self.head(f_adv, "pgd"), tau, reduction="per_image"))


class ACL(Method):
    """ACL: contrastive PGD on the views (eval mode, pgd BN), NT-Xent on clean and adversarial pairs."""

    name = "acl"
    citation = CITATION["acl"]
    Options = ACLOptions
    needs_attack = True
    wants_dual_bn = True
    finetune_rows = {"ACL": {"SLF": LINEAR_CELLS, "ALF": LINEAR_CELLS,
                             "AFF": every_column(batch_size=128, lr=0.1, epochs=100, milestones=(40, 60))}}

    def adversarial_views(self, views: Tensor) -> Tensor:
        """Attack both views jointly (A2A/DS) or only the even ones (A2S), maximising NT-Xent (see docs/methods.md,
        ACL)."""
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
        """RCS differentiates the projection head's linear layers with the plain ACL loss (any variant)."""
        return ContrastiveTarget(self.encoder, self.attack, self.augment, self.options.temperature)


@hookimpl
def rsslctl_methods() -> list[type]:
    return [ACL]
