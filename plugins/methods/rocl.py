"""RoCL (Kim, Tack, Hwang, "Adversarial Self-Supervised Contrastive Learning", NeurIPS 2020).

Instance-wise attack: x̃₁ maximises the contrastive loss between view 1 and the other view x₂ (PGD in eval mode,
random start). The original and adversarial views are positives of each other: the loss is the instance-wise
contrastive loss over the three views {x₁, x₂, x̃₁} of every image plus the regulariser NT-Xent(x̃₁, x₂) weighted 1/λ
(λ = 256). Single BN.

Equal by default to the authors' code (github.com/Kim-Minseon/RoCL, ``src/loss.py``, ``src/attack_lib.py``
``RepresentationAdv.get_loss``, ``src/rocl_train.py``; commit b6d5185): the three-view term sums each anchor's two
positive terms (Σ of the 6N pair terms / 3N, twice the mean NT-Xent over pairs, so 1/λ weighs the regulariser as
there); the regulariser comes from its own train-mode forward of the 2N images [x̃₁; x₂] (its own BN batch), the
three-view term from a forward of the 3N images [x₁; x₂; x̃₁]. The switch ``one_sided = true`` restores the
reference's similarity matrix against a detached transpose (gradients through the anchors only) in the loss *and* in
the attack objective. Remaining differences: the reference hard-codes τ = 0.5 in the attack and the regulariser
(here both use ``temperature``, 0.5 by default); it adds 1e-8 inside its norms and logs; on several GPUs its
regulariser and attack see only the local batch's negatives (here the global batch's, as the three-view term).
"""
from __future__ import annotations

import torch
from torch import Tensor

from rsslctl import MODES, Method, eval_mode, every_column, hookimpl, multi_view, nt_xent, pair_rows
from rsslctl_plugins.methods.options import CITATION, RoCLOptions


def instance_loss(z1: Tensor, z2: Tensor, z_adv: Tensor, temperature: float, one_sided: bool = False) -> Tensor:
    """RoCL's instance-wise term: every pair among an image's three embeddings is positive, the other images'
    3(N − 1) embeddings are negatives; each anchor's two positive terms are summed, anchors averaged (Σ of the 6N
    pair terms / 3N = 2 × the mean NT-Xent over anchor–positive pairs)."""
    three = torch.stack((z1, z2, z_adv), dim=1).flatten(0, 1)
    return 2 * nt_xent(three, temperature, n_views=3, one_sided=one_sided)


def rocl_loss(z1: Tensor, z2: Tensor, z_adv: Tensor, temperature: float, lamda: float, one_sided: bool = False,
              regulariser: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """L = instance_loss(z₁, z₂, z̃₁) + (1/λ)·NT-Xent(z̃₁, z₂) (Kim et al., NeurIPS 2020). ``regulariser`` = the
    embeddings (z̃₁, z₂) of the regulariser's own forward (default: the ones given)."""
    za_reg, z2_reg = regulariser if regulariser is not None else (z_adv, z2)
    return (instance_loss(z1, z2, z_adv, temperature, one_sided)
            + nt_xent(pair_rows(za_reg, z2_reg), temperature, one_sided=one_sided) / lamda)


class RoCL(Method):
    """RoCL: instance-wise PGD on view 1 against view 2; original, other view and adversarial view are positives."""

    name = "rocl"
    citation = CITATION["rocl"]
    Options = RoCLOptions
    needs_attack = True
    # RobustSSL benchmark: RoCL has no row of its own, so it gets the table's default cell in every mode
    finetune_rows = {"RoCL": {mode: every_column(batch_size=128, lr=0.1, milestones=(15, 20)) for mode in MODES}}

    def adversarial(self, x1: Tensor, x2: Tensor) -> Tensor:
        """x̃₁ = argmax over the ε-ball of NT-Xent(f(x̃₁), f(x₂)), model in eval mode, x₂'s embedding fixed."""
        o, enc = self.options, self.encoder
        with eval_mode(enc):
            target = enc(x2).detach()
            return self.attack.perturb(
                x1, lambda xa: nt_xent(pair_rows(enc(xa), target), o.temperature, one_sided=o.one_sided))

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o, enc = self.options, self.encoder
        views = multi_view(images, self.augment, 2)
        x1, x2 = views[0::2], views[1::2]
        adv = self.adversarial(x1, x2)
        regulariser = enc(torch.cat((adv, x2))).chunk(2)  # the reference's own forward: BN statistics of these 2N
        z1, z2, za = enc(torch.cat((x1, x2, adv))).chunk(3)  # then BN statistics of all 3N
        loss = rocl_loss(z1, z2, za, o.temperature, o.lamda, o.one_sided, regulariser)
        return loss, {"loss_adv": loss.detach()}


@hookimpl
def rsslctl_methods() -> list[type]:
    return [RoCL]
