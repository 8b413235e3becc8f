"""HCL (Robinson, Chuang, Sra, Jegelka, ICLR 2021, "Contrastive Learning with Hard Negative Samples"): SimCLR whose
negatives are re-weighted towards the hard ones, with the debiased estimator of the negative term.

Negatives are importance-weighted by e^{β·s/τ} (β = hardness; β = 0 gives the debiased loss), the weights
normalised to mean one, and the expected same-class share τ⁺ of the negatives is subtracted with the positive
as its estimate; the result is clamped below at N·e^{−1/τ}, its theoretical minimum.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rsslctl import Method, global_similarities, hookimpl, multi_view, positive_columns, self_mask
from rsslctl_plugins.methods.options import CITATION, HCLOptions


def hcl_loss(z: Tensor, temperature: float = 0.5, beta: float = 1.0, tau_plus: float = 0.1,
             clamp: bool = True) -> Tensor:
    """HCL loss of interleaved view pairs (rows 2k, 2k+1) (Robinson et al., ICLR 2021):

    pos_a = e^{s_ap/τ}, neg_ab = e^{s_ab/τ} over the N' = 2N − 2 others b ∉ {a, p}, w_ab = neg_ab^β;
    reweighted = N'·Σ_b w_ab·neg_ab / Σ_b w_ab;  Ng_a = (reweighted − τ⁺·N'·pos_a) / (1 − τ⁺),
    clamped to ≥ N'·e^{−1/τ};  loss = mean_a −log( pos_a / (pos_a + Ng_a) ). Computed in fp32.
    """
    sim, offset = global_similarities(z)  # the global batch's negatives in a data-parallel step
    sim = sim / temperature
    pos_col = positive_columns(z.shape[0], 2, z.device) + offset
    excluded = self_mask(sim, offset).scatter(1, pos_col, True)
    n_neg = sim.shape[1] - 2
    neg = sim.exp().masked_fill(excluded, 0.0)
    pos = sim.gather(1, pos_col)[:, 0].exp()
    w = torch.softmax((beta * sim).masked_fill(excluded, float("-inf")), dim=1)  # w_ab / Σ_b w_ab, overflow-free
    reweighted = n_neg * (w * neg).sum(1)
    ng = (reweighted - tau_plus * n_neg * pos) / (1 - tau_plus)
    if clamp:
        ng = ng.clamp_min(n_neg * math.exp(-1 / temperature))
    return -(pos / (pos + ng)).log().mean()


class HCL(Method):
    """HCL: SimCLR with hard-negative re-weighting (β) and the debiased negative term (τ⁺)."""

    name = "hcl"
    citation = CITATION["hcl"]
    Options = HCLOptions

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o = self.options
        loss = hcl_loss(self.encoder(multi_view(images, self.augment, 2)), o.temperature, o.beta, o.tau_plus, o.clamp)
        return loss, {"loss_nat": loss.detach()}


@hookimpl
def rsslctl_methods() -> list[type]:
    return [HCL]
