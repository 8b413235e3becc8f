"""MoCHi (Kalantidis, Sariyildiz, Pion, Weinzaepfel, Larlus, NeurIPS 2020, "Hard Negative Mixing for Contrastive
Learning"): MoCo v2 whose queue is extended, per query, by synthetic hard negatives.

For each query q, the N queue negatives most similar to q are the hard ones. MoCHi(N, s, s′) adds s mixes
h = normalize(α·n_i + (1−α)·n_j), α ~ U(0, 1), of two random hard negatives, and s′ mixes
h′ = normalize(β·q + (1−β)·n_j), β ~ U(0, β_max), β_max = 0.5, of the query with one: harder than the queue,
still closer to a negative than to q. Synthetic negatives carry no gradient (q enters h′ detached).

Fidelity: MoCHi has no public code (its authors released trained models only); this follows the paper (Sec. 4) on
MoCo v2 (github.com/facebookresearch/moco): query and key from separate forwards of the two views. Not reproduced:
MoCo's shuffle-BN across GPUs (identical on one device).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rsslctl import Method, NegativeQueue, UserError, ema_update, fp32, hookimpl, momentum_copy, multi_view
from rsslctl_plugins.methods.options import CITATION, MoCHiOptions


def mochi_negatives(q: Tensor, queue: Tensor, n_hard: int, s1: int, s2: int, beta_max: float = 0.5) -> Tensor:
    """Synthetic hard negatives [B, s1 + s2, D] (unit norm, no gradient) for unit queries q [B, D] and a queue [K, D]:
    s1 mixes of two of the ``n_hard`` queue entries most similar to each query, s2 mixes of the query with one."""
    q = q.detach()
    hard = queue[(q @ queue.t()).topk(min(n_hard, queue.shape[0]), dim=1).indices]  # [B, N, D], hardest first
    b, n, _ = hard.shape
    rows = torch.arange(b, device=q.device)[:, None]

    def pick(k: int) -> Tensor:  # k random hard negatives of each query [B, k, D] (integer indexing: no host sync)
        return hard[rows, torch.randint(0, n, (b, k), device=q.device)]

    alpha = torch.rand(b, s1, 1, device=q.device)
    mixed = alpha * pick(s1) + (1 - alpha) * pick(s1)
    beta = beta_max * torch.rand(b, s2, 1, device=q.device)
    with_query = beta * q[:, None] + (1 - beta) * pick(s2)
    return F.normalize(torch.cat([mixed, with_query], dim=1), dim=2)


def moco_loss(q: Tensor, k: Tensor, negatives: Tensor, temperature: float, extra: Tensor | None = None) -> Tensor:
    """MoCo's InfoNCE: mean_i −log( e^{q_i·k_i/τ} / (e^{q_i·k_i/τ} + Σ_j e^{q_i·n_j/τ} + Σ_h e^{q_i·h_ih/τ}) ) for unit
    q, k [B, D], shared negatives [K, D] and optional per-query negatives ``extra`` [B, S, D]. fp32."""
    with fp32(q):
        q, k = q.float(), k.float()
        parts = [(q * k).sum(1, keepdim=True), q @ negatives.float().t()]
        if extra is not None:
            parts.append(torch.einsum("bd,bsd->bs", q, extra.float()))
        logits = torch.cat(parts, dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCHi(Method):
    """MoCHi: MoCo v2 with hard negatives synthesised by mixing the hardest queue entries (and the query)."""

    name = "mochi"
    citation = CITATION["mochi"]
    Options = MoCHiOptions

    @classmethod
    def check_options(cls, options: MoCHiOptions, where: str) -> None:
        if options.n_hard > options.queue_size:
            raise UserError(f"{where}: n_hard = {options.n_hard} exceeds queue_size = {options.queue_size}; "
                            "lower n_hard or raise queue_size")

    def __init__(self, options: MoCHiOptions, encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        self.key_encoder = momentum_copy(encoder)
        self.queue = NegativeQueue(options.queue_size, encoder.out_dim)
        self.mixing = options.mix_from_epoch <= 1

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        self.mixing = epoch >= self.options.mix_from_epoch

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o = self.options
        views = multi_view(images, self.augment, 2)
        q = F.normalize(self.encoder(views[0::2]).float(), dim=1)
        with torch.no_grad():
            k = F.normalize(self.key_encoder(views[1::2]).float(), dim=1)
        negatives = self.queue.snapshot()
        extra = mochi_negatives(q, negatives, o.n_hard, o.s1, o.s2, o.beta_max) if self.mixing else None
        loss = moco_loss(q, k, negatives, o.temperature, extra)
        self.queue.push(k)
        return loss, {"loss_nat": loss.detach()}

    def after_optimizer_step(self) -> None:
        ema_update(self.key_encoder, self.encoder, self.options.momentum)


@hookimpl
def rsslctl_methods() -> list[type]:
    return [MoCHi]
