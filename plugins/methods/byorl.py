"""BYORL (Gowal, Huang, van den Oord, Mann, Kohli, "Self-supervised Adversarial Robustness for the Low-label,
High-data Regime", ICLR 2021): BYOL whose online inputs are adversarial.

Online network: encoder + projection head (the [encoder] head) + predictor q; target network: an EMA copy of encoder
and head, momentum from 0.996 to 1 on BYOL's cosine schedule. Each view is attacked (PGD, eval mode) to maximise
the BYOL loss of its online prediction against the target's projection of the other, clean view; the training loss
is that symmetrised BYOL loss on the adversarial views. The online encoder is the one evaluated.

Fidelity: BYORL has no public code; this follows the paper and BYOL's official code (github.com/google-deepmind/
deepmind-research, byol/byol_experiment.py): the two directions are summed, L = b(q₁, z̄₂) + b(q₂, z̄₁) with
b = mean_i (2 − 2·cos), and each view goes through the online and the target network in a forward of its own
(train-mode BatchNorm statistics per view). Switches restoring the earlier rsslctl behaviour: ``average_directions =
true`` halves the loss (the mean of the two directions), ``joint_forward = true`` forwards both views as one
interleaved 2N batch. The attack runs in eval mode, where the batch composition does not matter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rsslctl import (
    Method,
    MomentumSchedule,
    ema_update,
    eval_mode,
    fp32,
    hookimpl,
    mlp_head,
    momentum_copy,
    multi_view,
    pair_rows,
)
from rsslctl_plugins.methods.options import CITATION, BYORLOptions


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss, mean over rows: ‖p̄ − z̄‖² = 2 − 2·⟨p, z⟩/(‖p‖‖z‖) (Grill et al., NeurIPS 2020);
    ``z`` is the target projection (no gradient through it). Computed in fp32."""
    with fp32(p):
        return (2.0 - 2.0 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


def swap_views(t: Tensor) -> Tensor:
    """Interleaved rows [a₁, b₁, a₂, b₂, …] → [b₁, a₁, b₂, a₂, …]: each view's partner (the other view)."""
    return t.view(-1, 2, *t.shape[1:]).flip(1).flatten(0, 1)


class BYORL(Method):
    """BYORL: BYOL (online + predictor vs EMA target) trained on PGD views that maximise the BYOL loss."""

    name = "byorl"
    citation = CITATION["byorl"]
    Options = BYORLOptions
    needs_attack = True

    def __init__(self, options: BYORLOptions, encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        self.predictor = mlp_head(encoder.out_dim, options.pred_hidden, encoder.out_dim)
        self.target = momentum_copy(encoder)
        self.schedule = MomentumSchedule(options.momentum, options.cosine_momentum)

    def prepare(self, images: Tensor, total_steps: int) -> None:
        self.schedule.set_total_steps(total_steps)

    def online(self, x: Tensor) -> Tensor:
        return self.predictor(self.encoder(x))

    def per_view(self, net, views: Tensor) -> Tensor:
        """``net`` on interleaved views, one forward per view (BYOL's) or one 2N batch (``joint_forward``)."""
        return net(views) if self.options.joint_forward else pair_rows(net(views[0::2]), net(views[1::2]))

    def loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """b(q₁, z̄₂) + b(q₂, z̄₁) on interleaved rows (``average_directions``: half of it)."""
        return byol_loss(predictions, targets) * (1.0 if self.options.average_directions else 2.0)

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        views = multi_view(images, self.augment, 2)
        with torch.no_grad():
            targets = swap_views(self.per_view(self.target, views))  # row i: the target projection of its other view
        with eval_mode(self.encoder, self.predictor):
            adv = self.attack.perturb(views, lambda xa: self.loss(self.online(xa), targets))
        loss_adv = self.loss(self.per_view(self.online, adv), targets)
        metrics = {"loss_adv": loss_adv.detach()}
        if not self.options.clean_weight:
            return loss_adv, metrics
        loss_nat = self.loss(self.per_view(self.online, views), targets)
        metrics["loss_nat"] = loss_nat.detach()
        return loss_adv + self.options.clean_weight * loss_nat, metrics

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        ema_update(self.target, self.encoder, self.schedule.current())
        self.schedule.step()


@hookimpl
def rsslctl_methods() -> list[type]:
    return [BYORL]
