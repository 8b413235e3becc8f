"""SimCLR (Chen et al., 2020): two augmented views, NT-Xent between them, no adversary."""
from __future__ import annotations

from torch import Tensor

from rsslctl import Method, hookimpl, multi_view, nt_xent
from rsslctl_plugins.methods.options import CITATION, SimCLROptions


class SimCLR(Method):
    """SimCLR: NT-Xent on two augmented views (standard, non-robust contrastive learning)."""

    name = "simclr"
    citation = CITATION["simclr"]
    Options = SimCLROptions

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        views = multi_view(images, self.augment, 2)
        loss = nt_xent(self.encoder(views), self.options.temperature)
        return loss, {"loss_nat": loss.detach()}


@hookimpl
def rsslctl_methods() -> list[type]:
    return [SimCLR]
