"""DynACL (Luo, Wang, Wang, ICLR 2023): ACL with annealed augmentation strength and adversarial weight.

Per epoch e of E: augmentation strength s(e) = 1 − ⌊(e−1)/K⌋·K/E and weight ω(e); loss
½[(1−ω)·L_nat + (1+ω)·L_adv]. The official code also trains with a momentum ("key") encoder: view 1 goes through
the trained encoder, view 2 through its EMA copy (0.99), and the key encoder is the one evaluated; the AIR/RCS
re-implementations use a single encoder (``momentum_encoder = false``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from rsslctl import (
    MIN_STRENGTH,
    Encoder,
    Method,
    ema_update,
    eval_mode,
    every_column,
    hookimpl,
    momentum_copy,
    multi_view,
    nt_xent,
    pair_rows,
)
from rsslctl_plugins.methods.acl import LINEAR_CELLS
from rsslctl_plugins.methods.options import CITATION, DynACLOptions


def strength_schedule(epoch: int, total_epochs: int, period: int = 50) -> float:
    """DynACL's annealed strength for 1-based ``epoch``: ``s = 1 - floor((epoch - 1) / K) * K / E``.

    ``K`` is ``period`` and ``E`` is ``total_epochs`` (Luo et al., ICLR 2023); the result never drops below
    ``MIN_STRENGTH``. For E = 1000, K = 50 it steps 1.0, 0.95, ..., 0.05 (20 values).
    """
    if epoch < 1 or total_epochs < 1 or period < 1:
        raise ValueError(f"need epoch >= 1, total_epochs >= 1, period >= 1; got {epoch}, {total_epochs}, {period}")
    done = (epoch - 1) // period * period
    return max((total_epochs - done) / total_epochs, MIN_STRENGTH)


def dynacl_weight(epoch: int, total_epochs: int, period: int = 50, swap: float = 2 / 3,
                  form: str = "air") -> float:
    """DynACL's adversarial weight ω for 1-based ``epoch`` in ``(1−ω)·L_nat + (1+ω)·L_adv``.

    ``form = "air"`` (AIR/RCS re-implementations): ω = swap·(1 − s(e)) with s the strength schedule.
    ``form = "official"`` (PKU-ML/DYNACL): ω = min(⌊e/K⌋·(K/E)·swap, 1), i.e. w_adv − 1; it steps up one epoch
    before the augmentation strength changes.
    """
    if form == "official":
        return min((epoch // period) * (period / total_epochs) * swap, 1.0)
    if form != "air":
        raise ValueError(f"unknown DynACL weight form {form!r}; use 'air' or 'official'")
    return swap * (1.0 - strength_schedule(epoch, total_epochs, period))


_AFF = every_column(batch_size=128, lr=0.1, milestones=(15, 20)) | {
    "STL-10 96px": {"batch_size": 128, "lr": 0.1, "milestones": (10, 20)}}


class DynACL(Method):
    """DynACL: dual-stream ACL with annealed augmentation and ω; optional EMA key encoder."""

    name = "dynacl"
    citation = CITATION["dynacl"]
    Options = DynACLOptions
    needs_attack = True
    wants_dual_bn = True
    # DynACL++ is the row of a DynACL run after `rsslctl dynacl-pp`
    finetune_rows = {row: {"SLF": LINEAR_CELLS, "ALF": LINEAR_CELLS, "AFF": _AFF} for row in ("DynACL", "DynACL++")}

    def __init__(self, options: DynACLOptions, encoder: Encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        self.key_encoder = momentum_copy(encoder) if options.momentum_encoder else None
        # ω as a tensor: a Python float read in the step would be a compile-time constant, and torch.compile would
        # recompile the step at every change (20 over a 1000-epoch run, past dynamo's recompile limit)
        self.register_buffer("omega_t", torch.zeros(()), persistent=False)

    @property
    def omega(self) -> float:
        return float(self.omega_t)

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        o = self.options
        if o.anneal_augment:
            self.augment.set_strength(strength_schedule(epoch, total_epochs, o.period))
        self.omega_t.fill_(dynacl_weight(epoch, total_epochs, o.period, o.swap, o.weight_form))

    def embed(self, views: Tensor, route: str) -> Tensor:
        """Interleaved embeddings; with the key encoder, odd rows (view 2) go through it (official 'swap')."""
        if self.key_encoder is None:
            return self.encoder(views, route)
        return pair_rows(self.encoder(views[0::2], route), self.key_encoder(views[1::2], route))

    def embeddings(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(z, z̃) of ACL-DS: contrastive PGD on both views jointly (eval mode, pgd BN),
        then clean views through the normal BN and adversarial views through the pgd BN (train mode)."""
        tau = self.options.temperature
        views = multi_view(images, self.augment, 2)
        with eval_mode(self):
            adv = self.attack.perturb(views, lambda xa: nt_xent(self.embed(xa, "pgd"), tau))
        return self.embed(views, "normal"), self.embed(adv, "pgd")

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z, z_adv = self.embeddings(images)
        loss_nat, loss_adv = nt_xent(z, self.options.temperature), nt_xent(z_adv, self.options.temperature)
        w = self.omega_t
        loss = 0.5 * ((1 - w) * loss_nat + (1 + w) * loss_adv)
        return loss, {"loss_nat": loss_nat.detach(), "loss_adv": loss_adv.detach()}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.key_encoder is not None:  # θ_k ← m·θ_k + (1−m)·θ_q, parameters only (BN buffers: own forwards)
            ema_update(self.key_encoder, self.encoder, self.options.momentum)

    def eval_encoder(self) -> Encoder:
        return self.key_encoder if self.key_encoder is not None else self.encoder


@hookimpl
def rsslctl_methods() -> list[type]:
    return [DynACL]
