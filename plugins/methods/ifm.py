"""IFM (Robinson, Sun, Yu, Batmanghelich, Jegelka, Sra, NeurIPS 2021, "Can contrastive learning avoid shortcut
solutions?"): implicit feature modification — a closed-form adversary in embedding space.

For an anchor q (unit norm), each key may move by at most ε (ℓ2) to raise the InfoNCE loss. The loss grows with
every negative logit and falls with the positive one, and q·(v + δ) = q·v + q·δ with |q·δ| ≤ ε, so the worst
case is δ = +εq for every negative and −εq for the positive: the logits s⁺ − ε and s⁻ + ε, with no extra
forward or backward pass. Here it is built on SimCLR's NT-Xent (two views, 2N − 2 in-batch negatives).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rsslctl import Method, global_similarities, hookimpl, multi_view, positive_columns, self_mask
from rsslctl_plugins.methods.options import CITATION, IFMOptions


def ifm_nt_xent(z: Tensor, temperature: float = 0.5, epsilon: float = 0.1) -> Tensor:
    """NT-Xent of interleaved view pairs (rows 2k, 2k+1) with IFM's ε-perturbed logits (Robinson et al. 2021):

    ℓ_a = −log( e^{(s_ap − ε)/τ} / ( e^{(s_ap − ε)/τ} + Σ_{b ∉ {a, p}} e^{(s_ab + ε)/τ} ) ), s = cosine similarity,
    averaged over the 2N anchors. ``epsilon = 0`` is SimCLR's NT-Xent. Computed in fp32.
    """
    sim, offset = global_similarities(z)  # the global batch's negatives in a data-parallel step
    pos = positive_columns(z.shape[0], 2, z.device) + offset  # [m, 1]
    shift = torch.full_like(sim, epsilon).scatter(1, pos, -epsilon)  # +ε on negatives, −ε on the positive
    logits = ((sim + shift) / temperature).masked_fill(self_mask(sim, offset), float("-inf"))
    return F.cross_entropy(logits, pos[:, 0])


class IFM(Method):
    """IFM: SimCLR with implicit feature modification (closed-form ε-perturbation of the logits)."""

    name = "ifm"
    citation = CITATION["ifm"]
    Options = IFMOptions

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o = self.options
        z = self.encoder(multi_view(images, self.augment, 2))
        loss_adv = ifm_nt_xent(z, o.temperature, o.epsilon)
        if o.ifm_only:
            return loss_adv, {"loss_adv": loss_adv.detach()}
        loss_nat = ifm_nt_xent(z, o.temperature, 0.0)
        loss = (loss_nat + o.alpha * loss_adv) / (1 + o.alpha)
        return loss, {"loss_nat": loss_nat.detach(), "loss_adv": loss_adv.detach()}


@hookimpl
def rsslctl_methods() -> list[type]:
    return [IFM]
