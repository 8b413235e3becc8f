"""AdCo (Hu, Wang, Hu, Qi, CVPR 2021, "AdCo: Adversarial Contrast for Efficient Learning of Unsupervised
Representations from Self-Trained Negative Adversaries"): a bank of K negatives trained against the encoder.

The query encoder minimises InfoNCE of q against its key k (EMA key encoder) and the bank's unit vectors n_j;
the bank maximises the same loss at its own temperature τ_n by SGD ascent with its own learning rate, so its
vectors move towards a softmax-weighted mix of the current queries. The bank is used unit-normalised: the
adversary lives on the unit sphere, whatever the step size.

Fidelity: the authors' code is github.com/maple-research-lab/AdCo (model/AdCo.py, training/train.py, commit
fd65f12). With ``symmetric`` each view goes through the query and the key encoder in a forward of its own (BatchNorm
statistics per view), as theirs; ``joint_forward = true`` restores the earlier single interleaved 2N-image forward
(faster; BN statistics over both views, so a different train-mode loss). ``batch_keys = true`` restores their use of
the other images' keys as extra negatives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rsslctl import BankMethod, fp32, hookimpl, multi_view, normalized_rows_grad, softmax_logit_grad
from rsslctl_plugins.methods.options import CITATION, AdCoOptions


def adco_logits(q: Tensor, k: Tensor, bank: Tensor, batch_keys: bool = False) -> tuple[Tensor, Tensor]:
    """(raw cosine logits, labels) of AdCo for unit q, k [B, D] and unit bank vectors [K, D]:
    [q_i·k_i | q_i·n_j] with label 0, or with ``batch_keys`` [q_i·k_b for every b | q_i·n_j] with label i
    (the reference code: the other images' keys are extra negatives)."""
    with fp32(q):
        q, k, bank = q.float(), k.float(), bank.float()
        pos = q @ k.t() if batch_keys else (q * k).sum(1, keepdim=True)
        logits = torch.cat([pos, q @ bank.t()], dim=1)
    labels = (torch.arange(q.shape[0], device=q.device) if batch_keys
              else torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
    return logits, labels


def adco_loss(logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """L = mean_i −log softmax(l_i/τ)[y_i]: the encoder minimises it at τ, the bank maximises it at τ_n."""
    return F.cross_entropy(logits / temperature, labels)


class AdCo(BankMethod):
    """AdCo: MoCo-style encoder against a bank of negatives trained by gradient ascent (own LR and temperature)."""

    name = "adco"
    citation = CITATION["adco"]
    Options = AdCoOptions

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o = self.options
        views = multi_view(images, self.augment, 2)
        if not o.symmetric:
            q = F.normalize(self.encoder(views[0::2]).float(), dim=1)
            with torch.no_grad():
                k = F.normalize(self.key_encoder(views[1::2]).float(), dim=1)
        else:  # rows interleaved (2i: view 1 of image i, 2i+1: view 2)
            q = F.normalize(self.forward_views(self.encoder, views).float(), dim=1)
            with torch.no_grad():
                k = F.normalize(self.forward_views(self.key_encoder, views).float(), dim=1)
        # (query, key of the other view) pairs: view 1 against view 2, and with `symmetric` also the reverse
        pairs = [(q[0::2], k[1::2]), (q[1::2], k[0::2])] if o.symmetric else [(q, k)]
        bank, losses, direction = self.bank.vectors(), [], 0.0
        for qi, ki in pairs:
            logits, targets = adco_logits(qi, ki, bank, o.batch_keys)
            losses.append(adco_loss(logits, targets, o.temperature))
            # the bank's ascent direction on L at τ_n, from this step's queries (applied after the encoder's step)
            g = softmax_logit_grad(logits, targets, o.bank_temperature)[:, logits.shape[1] - self.bank.size:]
            direction = direction + normalized_rows_grad(qi, self.bank.weight, g) / len(pairs)
        self.bank.record(direction)
        if o.init_from_keys:
            self.bank.fill(pairs[0][1])
        loss = sum(losses) / len(losses)
        return loss, {"loss_nat": loss.detach()}

@hookimpl
def rsslctl_methods() -> list[type]:
    return [AdCo]
