"""AIR (Xu et al., NeurIPS 2023): ACL/DynACL + standard (SIR) and adversarial (AIR) invariant regularisation.

L = (1−ω)·L_CL(nat) + (1+ω)·L_CL(adv) + λ1·SIR + λ2·AIR (no ½ factor), with ω from the
DynACL schedule when ``dynamic`` (DynACL-AIR) and ω = 0 otherwise (ACL-AIR). The regularisers compare
batch-level distributions of positive-pair similarities with the un-augmented original image.

``kl_impl = "true_kl"`` (default) computes the paper's KL divergences; ``"reference"`` computes what the
official code does (softmax fed where kl_div expects log-probabilities, unnormalised products), which is
−H(q) − <q, p> rather than a KL (see docs/methods.md, AIR).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rsslctl import cells, every_column, fp32, hookimpl, nt_xent
from rsslctl_plugins.methods.dynacl import DynACL
from rsslctl_plugins.methods.options import CITATION, AIROptions


def batch_log_softmax(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """log π(a, b): log-softmax over the batch index k of the positive-pair logits <a_k, b_k>/τ."""
    return F.log_softmax((a * b).sum(1) / temperature, dim=0)


def invariance_regularisers(zi: Tensor, zj: Tensor, zo: Tensor, zi_adv: Tensor, zj_adv: Tensor,
                            temperature: float = 0.5, kl_impl: str = "true_kl") -> tuple[Tensor, Tensor]:
    """(SIR, AIR) for views i, j, the original image o and the adversarial views (rows = images)."""
    with fp32(zi):
        zi, zj, zo, zi_adv, zj_adv = (F.normalize(z.float(), dim=1) for z in (zi, zj, zo, zi_adv, zj_adv))
        log_pi, log_pj = batch_log_softmax(zi, zo, temperature), batch_log_softmax(zj, zo, temperature)
        # log of the (unnormalised) products π(z̃, z_o)·π(z̃, z)
        log_Pi = batch_log_softmax(zi_adv, zo, temperature) + batch_log_softmax(zi_adv, zi, temperature)
        log_Pj = batch_log_softmax(zj_adv, zo, temperature) + batch_log_softmax(zj_adv, zj, temperature)
        if kl_impl == "reference":  # Σ_k q_k (log q_k − p_k), with p given as probabilities (official AIR.py)
            sir = (log_pj.exp() * (log_pj - log_pi.exp())).sum()
            air = (log_Pj.exp() * (log_Pj - log_Pi.exp())).sum()
        elif kl_impl == "true_kl":  # KL(p_i ‖ p_j) and KL(P̂_i ‖ P̂_j) with P̂ = P / ΣP
            sir = (log_pi.exp() * (log_pi - log_pj)).sum()
            log_Pi, log_Pj = log_Pi - torch.logsumexp(log_Pi, 0), log_Pj - torch.logsumexp(log_Pj, 0)
            air = (log_Pi.exp() * (log_Pi - log_Pj)).sum()
        else:
            raise ValueError(f"kl_impl must be 'true_kl' or 'reference', got {kl_impl!r}")
    return sir, air


class AIR(DynACL):
    """ACL-AIR / DynACL-AIR: DynACL losses plus SIR and AIR with the original image as a third input."""

    name = "air"
    citation = CITATION["air"]
    Options = AIROptions
    # the ALF cells of the AIR rows do not restate the LR milestones; the SLF ones (10, 20) are used.
    # DynACL-AIR++ is the row of a DynACL-AIR run after `rsslctl dynacl-pp` (it has no STL-10 32px column).
    finetune_rows = {
        "ACL-AIR": {"SLF": cells((512, 0.005), (512, 0.1), (512, 0.01), (128, 0.01), milestones=(10, 20)),
                    "ALF": cells((512, 0.01), (512, 0.1), (512, 0.01), (128, 0.01), milestones=(10, 20)),
                    "AFF": every_column(batch_size=128, lr=0.1, epochs=100, milestones=(40, 60))},
        "DynACL-AIR": {"SLF": cells((512, 0.01, {"epochs": 5}), (512, 0.1), (512, 0.1), (128, 0.01),
                                    milestones=(10, 20)),
                       "ALF": cells((512, 0.01), (512, 0.1), (128, 0.1), (128, 0.01), milestones=(10, 20)),
                       "AFF": every_column(batch_size=128, lr=0.1, milestones=(15, 20))},
        "DynACL-AIR++": {"SLF": cells((512, 0.01), (512, 0.1), (512, 0.1), None, milestones=(10, 20)),
                         "ALF": cells((512, 0.01, {"epochs": 4}), (512, 0.1), (128, 0.1), None, milestones=(10, 20)),
                         "AFF": every_column(batch_size=128, lr=0.1, milestones=(15, 20))},
    }

    def finetune_row(self) -> str:
        """ACL-AIR (fixed ω, fixed strength) and DynACL-AIR have rows of their own."""
        return "DynACL-AIR" if self.options.dynamic else "ACL-AIR"

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        if self.options.dynamic:
            super().on_epoch_start(epoch, total_epochs)

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o = self.options
        z, z_adv = self.embeddings(images)
        z_orig = self.encoder(images.float().div(255.0), "normal")  # third forward: BN stats of the originals alone
        loss_nat, loss_adv = nt_xent(z, o.temperature), nt_xent(z_adv, o.temperature)
        sir, air = invariance_regularisers(z[0::2], z[1::2], z_orig, z_adv[0::2], z_adv[1::2], o.temperature,
                                           o.kl_impl)
        w = self.omega_t
        loss = (1 - w) * loss_nat + (1 + w) * loss_adv + o.lambda1 * sir + o.lambda2 * air
        return loss, {"loss_nat": loss_nat.detach(), "loss_adv": loss_adv.detach(), "sir": sir.detach(),
                      "air": air.detach()}


@hookimpl
def rsslctl_methods() -> list[type]:
    return [AIR]
