"""CaCo (Wang, Huang, Zeng, Qi, 2022, "CaCo: Both Positive and Negative Samples are Directly Learnable via
Cooperative-adversarial Contrastive Learning"): a learnable bank supplies both the positive and the negatives.

Both views go through the query encoder (q₁, q₂) and the EMA key encoder (k₁, k₂). The positive of q₁ is the
bank vector closest to the other view's key, y₁ = argmax_j k₂·n_j (symmetrically y₂ from k₁); every other bank
vector is a negative. The encoder minimises CE(q₁·nᵀ/τ, y₁) + CE(q₂·nᵀ/τ, y₂). The bank is updated with the same
loss at τ_n: by descent for each query's positive (cooperative) and ascent for its negatives (adversarial), with
its own SGD; its vectors are used unit-normalised.

Fidelity: the authors' code is github.com/maple-research-lab/CaCo (model/CaCo.py, training/train_caco.py, commit
a72b345). Each view goes through the query and the key encoder in a forward of its own (BatchNorm statistics per
view), as theirs; ``joint_forward = true`` restores the earlier single interleaved 2N-image forward (faster; BN
statistics over both views, so a different train-mode loss). The key encoder's momentum follows their
``--moco_m_decay 1`` (every command of their README): a cosine over epochs, m = 1 − (1 − m₀)·(cos(π·e/E) + 1)/2 for
0-based epoch e of E, constant within an epoch; ``cosine_momentum = false`` keeps m₀ throughout (their
``--moco_m_decay 0``, and the earlier rsslctl behaviour). Remaining difference: they update the key encoder just
before each step's key forward, we after each optimizer step, so the one update between two epochs uses the
finishing epoch's m instead of the next one's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rsslctl import BankMethod, MomentumSchedule, fp32, hookimpl, multi_view, normalized_rows_grad, softmax_logit_grad
from rsslctl_plugins.methods.options import CITATION, CaCoOptions


def caco_loss(q: Tensor, key_other: Tensor, bank: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, raw logits q·nᵀ [B, K], positives y) of one view: y_i = argmax_j key_i·n_j and
    loss = mean_i −log softmax(q_i·nᵀ/τ)[y_i], for unit q, keys [B, D] and unit bank vectors n [K, D]."""
    with fp32(q):
        bank = bank.float()
        y = (key_other.float() @ bank.t()).argmax(1)
        logits = q.float() @ bank.t()
    return F.cross_entropy(logits / temperature, y), logits, y


def caco_bank_direction(q: Tensor, weight: Tensor, logits: Tensor, y: Tensor, temperature: float) -> Tensor:
    """Update direction of the bank rows W [K, D] for one view: ∂L/∂W at τ_n with each query's positive column
    sign-flipped, i.e. ascent for negatives and descent for the positive (the cooperative-adversarial rule)."""
    g = softmax_logit_grad(logits, y, temperature)
    g = g.scatter(1, y[:, None], -g.gather(1, y[:, None]))
    return normalized_rows_grad(q, weight, g)


class CaCo(BankMethod):
    """CaCo: learnable positives (cooperative) and negatives (adversarial) in one bank, symmetric MoCo-style loss."""

    name = "caco"
    citation = CITATION["caco"]
    Options = CaCoOptions

    def __init__(self, options: CaCoOptions, encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        self.schedule = MomentumSchedule(options.momentum, options.cosine_momentum, per_epoch=True)  # holds no state

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        o = self.options
        warm = o.bank_warmup_epochs
        self.bank.set_lr(o.bank_lr * epoch / warm if epoch <= warm else o.bank_lr)
        self.schedule.set_epoch(epoch, total_epochs)

    def key_momentum(self) -> float:
        return self.schedule.current()

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o = self.options
        views = multi_view(images, self.augment, 2)
        q = F.normalize(self.forward_views(self.encoder, views).float(), dim=1)
        with torch.no_grad():
            k = F.normalize(self.forward_views(self.key_encoder, views).float(), dim=1)
        bank = self.bank.vectors()
        loss1, logits1, y1 = caco_loss(q[0::2], k[1::2], bank, o.temperature)
        loss2, logits2, y2 = caco_loss(q[1::2], k[0::2], bank, o.temperature)
        self.bank.record(caco_bank_direction(q[0::2], self.bank.weight, logits1, y1, o.bank_temperature)
                         + caco_bank_direction(q[1::2], self.bank.weight, logits2, y2, o.bank_temperature))
        if o.init_from_keys:
            self.bank.fill(k[1::2])
        loss = loss1 + loss2  # summed over the two views, as the reference
        return loss, {"loss_nat": loss.detach()}

@hookimpl
def rsslctl_methods() -> list[type]:
    return [CaCo]
