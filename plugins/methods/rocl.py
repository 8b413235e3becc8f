"""RoCL (Kim, Tack, Hwang, "Adversarial Self-Supervised Contrastive Learning", NeurIPS 2020).

Instance-wise attack: x̃₁ maximises the contrastive loss between view 1 and the other view x₂ (PGD in eval mode,
random start). The original and adversarial views are positives of each other: the loss is NT-Xent over the three
views {x₁, x₂, x̃₁} of every image plus the regulariser NT-Xent(x̃₁, x₂) weighted 1/λ (λ = 256). Single BN.
Reference quirk behind a switch: its similarity matrix multiplies by a detached transpose (``one_sided``).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from rsslctl import hookimpl, eval_mode, every_column, Method, MODES, multi_view, nt_xent, opt, pair_rows


def rocl_loss(z1: Tensor, z2: Tensor, z_adv: Tensor, temperature: float, lamda: float,
              one_sided: bool = False) -> Tensor:
    """L = NT-Xent₃({z₁, z₂, z̃₁}) + (1/λ)·NT-Xent(z̃₁, z₂) (Kim et al., NeurIPS 2020).

    NT-Xent₃ treats every pair among an image's three embeddings as positives and the other images' 3(N − 1)
    embeddings as negatives (mean over all anchor–positive pairs).
    """
    three = torch.stack((z1, z2, z_adv), dim=1).flatten(0, 1)
    return (nt_xent(three, temperature, n_views=3, one_sided=one_sided)
            + nt_xent(pair_rows(z_adv, z2), temperature, one_sided=one_sided) / lamda)


@dataclasses.dataclass
class RoCLOptions:
    temperature: float = opt(0.5, "NT-Xent temperature τ", min=1e-3)
    lamda: float = opt(256.0, "λ: the regulariser NT-Xent(x̃₁, x₂) is weighted 1/λ (reference --lamda)", min=1e-6)
    one_sided: bool = opt(False, "reference quirk: similarities against a detached copy, gradients through one side")


class RoCL(Method):
    """RoCL: instance-wise PGD on view 1 against view 2; original, other view and adversarial view are positives."""

    name = "rocl"
    citation = ("@inproceedings{kim2020rocl, title={Adversarial Self-Supervised Contrastive Learning}, "
                "author={Kim, Minseon and Tack, Jihoon and Hwang, Sung Ju}, booktitle={NeurIPS}, year={2020}}")
    Options = RoCLOptions
    needs_attack = True
    # RobustSSL benchmark: RoCL has no row of its own, so it gets the table's default cell in every mode
    finetune_rows = {"RoCL": {mode: every_column(batch_size=128, lr=0.1, milestones=(15, 20)) for mode in MODES}}

    def adversarial(self, x1: Tensor, x2: Tensor) -> Tensor:
        """x̃₁ = argmax over the ε-ball of NT-Xent(f(x̃₁), f(x₂)), model in eval mode, x₂'s embedding fixed."""
        tau, enc = self.options.temperature, self.encoder
        with eval_mode(enc):
            target = enc(x2).detach()
            return self.attack.perturb(x1, lambda xa: nt_xent(pair_rows(enc(xa), target), tau))

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o = self.options
        views = multi_view(images, self.augment, 2)
        x1, x2 = views[0::2], views[1::2]
        adv = self.adversarial(x1, x2)
        z1, z2, za = self.encoder(torch.cat((x1, x2, adv))).chunk(3)  # one forward: BN statistics of all 3N
        loss = rocl_loss(z1, z2, za, o.temperature, o.lamda, o.one_sided)
        return loss, {"loss_adv": loss.detach()}


@hookimpl
def rsslctl_methods() -> list[type]:
    return [RoCL]
