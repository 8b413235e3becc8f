"""Adversarial SimCLR and SimCLR-FreeAdv as in CF-AMC-SSL.

Only view 2 is attacked: the attack maximises NT-Xent between f(x2) and f(x2 + δ) (instance-wise,
RoCL-like); training pairs are (x1 clean, x2 + δ). ``training = "free"`` keeps δ across minibatches and
replays each minibatch m times (SimCLR-FreeAdv). Single BN, τ = 0.07 (SupCon in unsupervised mode).
"""
from __future__ import annotations

import dataclasses

from torch import Tensor

from rsslctl import hookimpl
from rsslctl.adv_training import AdversarialTraining, AdvTrainingOptions
from rsslctl.augment import multi_view
from rsslctl.losses import nt_xent, pair_rows
from rsslctl.method import Method
from rsslctl.options import opt


@dataclasses.dataclass
class SimCLRAdvOptions(AdvTrainingOptions):
    temperature: float = opt(0.07, "NT-Xent temperature τ (CF-AMC-SSL: 0.07)", min=1e-3)


class SimCLRAdv(AdversarialTraining, Method):
    """SimCLR with PGD-AT (or free AT) on the second view."""

    name = "simclr_adv"
    citation = ("@article{ghofrani2025cfamcssl, "
                "title={Rapid Learning of Adversarially Robust Representations with Cost-Free Adversarial Multi-Crop Self-Supervised Learning}, "
                "author={Ghofrani, Ali and Jamshidi, Fatemeh}, journal={arXiv:2501.03507}, year={2025}}")
    Options = SimCLRAdvOptions
    needs_attack = True

    def __init__(self, options: SimCLRAdvOptions, encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        self.setup_adversarial()

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        tau, enc = self.options.temperature, self.encoder
        views = self.replayed(lambda: multi_view(images, self.augment, 2))
        x1, x2 = views[0::2], views[1::2]
        adv, extra = self.adversarial(x2, lambda xa: nt_xent(pair_rows(enc(x2), enc(xa)), tau))
        loss = nt_xent(pair_rows(enc(x1), enc(adv)), tau)
        return (loss if extra is None else loss + extra), {"loss_adv": loss.detach()}


@hookimpl
def rsslctl_methods() -> list[type]:
    return [SimCLRAdv]
