"""SimCLR (Chen et al., 2020): two augmented views, NT-Xent between them, no adversary."""
from __future__ import annotations

import dataclasses

from torch import Tensor

from rsslctl import hookimpl, Method, multi_view, nt_xent, opt


@dataclasses.dataclass
class SimCLROptions:
    temperature: float = opt(0.5, "NT-Xent temperature τ", min=1e-3)


class SimCLR(Method):
    """SimCLR: NT-Xent on two augmented views (standard, non-robust contrastive learning)."""

    name = "simclr"
    citation = ("@inproceedings{chen2020simclr, "
                "title={A Simple Framework for Contrastive Learning of Visual Representations}, author={Chen, "
                "Ting and Kornblith, Simon and Norouzi, Mohammad and Hinton, Geoffrey}, booktitle={ICML}, "
                "year={2020}}")
    Options = SimCLROptions

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        views = multi_view(images, self.augment, 2)
        loss = nt_xent(self.encoder(views), self.options.temperature)
        return loss, {"loss_nat": loss.detach()}


@hookimpl
def rsslctl_methods() -> list[type]:
    return [SimCLR]
