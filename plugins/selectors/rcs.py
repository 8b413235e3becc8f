"""RCS (Xu et al., NeurIPS 2023, "Efficient Adversarial Contrastive Learning via Robustness-Aware Coreset
Selection"): robustness-aware coreset selection by greedy gradient matching.

One round: hold the model fixed except the target's linear layers (ACL: projection head; SAT: last layer);
sketch every unit's training-loss gradient; attack the unlabeled validation set to maximise the representational
divergence (RD) and sketch its gradient; greedily pick the unit whose sketch has the largest dot product with the
validation sketch, take one SGD step on the layers with that unit's full gradient, re-attack the validation set and
recompute its gradient; repeat until the budget is filled; restore the layers.

Gradients are computed per selection unit in shards that ``gather`` concatenates: the seam a multi-GPU engine
all-gathers across ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsslctl import (
    Attack,
    CoresetSelector,
    CoresetTarget,
    SelectionContext,
    UserError,
    all_gather_objects,
    derive_seed,
    eval_mode,
    fp32,
    hookimpl,
    make_attack,
    rank,
    world_size,
)
from rsslctl_plugins.selectors.options import CITATION, RCSOptions


def representational_divergence(nat: Tensor, adv: Tensor, kind: str) -> Tensor:
    """RD between natural and adversarial outputs [N, D] (see docs/methods.md, RCS).

    minmax_kl (small-scale reference): each row min–max scaled to [0, 1], +1e-8, then the elementwise mean of
    p·(log p − log q) with p = adversarial, q = natural. softmax_kl (ImageNet / SAT-RCS): KL(softmax(nat) ‖
    softmax(adv)) summed over the D entries, averaged over rows.
    """
    with fp32(nat):
        nat, adv = nat.float(), adv.float()
        if kind == "minmax_kl":
            def scale(h: Tensor) -> Tensor:
                lo, hi = h.min(1, keepdim=True).values, h.max(1, keepdim=True).values
                return (h - lo) / (hi - lo).clamp_min(1e-12) + 1e-8
            p, q = scale(adv), scale(nat)
            return (p * (p.log() - q.log())).mean()
        log_p, log_q = F.log_softmax(nat, 1), F.log_softmax(adv, 1)
        return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def rd_attack(target: CoresetTarget, x: Tensor, attack: Attack, divergence: str,
              nat_features: Tensor | None = None) -> Tensor:
    """Adversarial inputs maximising RD against the (fixed) natural outputs; the model is in eval mode.
    ``nat_features``: ``target.features(x, nat_route)`` when the caller already has them (they are frozen)."""
    nat_route, adv_route = target.routes
    with torch.no_grad():
        f = target.features(x, nat_route) if nat_features is None else nat_features
        nat = target.head(f, nat_route)
    return attack.perturb(x, lambda xa: representational_divergence(nat, target.outputs(xa, adv_route), divergence))


def sketch(grads: list[Tensor]) -> Tensor:
    """Compress per-unit gradients of linear layers: weight [k, out, in] → mean over out ([k, in]); bias [k, out] →
    its mean ([k, 1]); concatenated. The RCS approximation: 1537-d for the ACL head at 512-d."""
    return torch.cat([g.mean(1) if g.dim() == 3 else g.mean(1, keepdim=True) for g in grads], dim=1)


def layer_params(layers: list[nn.Linear]) -> list[Tensor]:
    return [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]


def unit_gradients(target: CoresetTarget, images: Tensor, labels: Tensor, unit: int) -> list[Tensor]:
    """Gradients of each unit's mean training loss w.r.t. the layers' parameters, batched: one list entry per
    parameter, shape [N/unit, *param]. Negatives in a contrastive loss come from the whole minibatch."""
    losses = target.training_losses(images, labels)
    n, k = losses.shape[0], losses.shape[0] // unit
    weights = torch.zeros(k, n, device=losses.device)
    weights.view(k, k, unit)[torch.arange(k), torch.arange(k)] = 1.0 / unit  # row j averages unit j's images
    params = layer_params(target.layers())
    if k == 1:
        return [g.unsqueeze(0) for g in torch.autograd.grad(losses, params, grad_outputs=weights[0])]
    return list(torch.autograd.grad(losses, params, grad_outputs=weights, is_grads_batched=True))


@dataclasses.dataclass
class GradientShard:
    """Per-unit gradient sketches (and optionally full flattened gradients) of some units of one round."""

    units: Tensor  # [k] unit ids (positions in the round's unit list)
    sketches: Tensor  # [k, D]
    full: Tensor | None  # [k, P]

    def cpu(self) -> GradientShard:
        """The shard in host memory (what ranks exchange)."""
        return GradientShard(self.units.cpu(), self.sketches.cpu(), None if self.full is None else self.full.cpu())


def compute_gradients(target: CoresetTarget, images: Tensor, labels: Tensor, pool: Tensor, batch_size: int,
                      unit: int, seed: int, keep_full: bool, shard: tuple[int, int] = (0, 1)
                      ) -> tuple[Tensor, GradientShard]:
    """Cut the shuffled pool into minibatches of ``batch_size`` (the last partial one is dropped) and units of
    ``unit`` images; return (unit → image indices [U, unit], this shard's gradients).

    Minibatch b belongs to shard ``b % world``, and its randomness (augmentation, attack start) is seeded by
    (seed, b), so shards computed on different workers and gathered equal a single-worker computation.
    """
    rank, world = shard
    g = torch.Generator().manual_seed(seed)
    order = pool[torch.randperm(len(pool), generator=g)]
    n_batches = len(order) // batch_size
    units = order[: n_batches * batch_size].view(-1, unit)
    per_batch = batch_size // unit
    ids, sketches, full = [], [], []
    for b in range(rank, n_batches, world):
        torch.manual_seed(derive_seed(seed, b))
        idx = units[b * per_batch:(b + 1) * per_batch].flatten().to(images.device)
        grads = unit_gradients(target, images[idx], labels[idx], unit)
        ids.append(torch.arange(b * per_batch, (b + 1) * per_batch))
        sketches.append(sketch(grads).detach())
        if keep_full:
            full.append(torch.cat([gr.flatten(1) for gr in grads], 1).detach())
    empty = torch.zeros(0, dtype=torch.long)
    return units, GradientShard(torch.cat(ids) if ids else empty,
                                torch.cat(sketches) if sketches else torch.zeros(0),
                                torch.cat(full) if full else None)


def gather(shards: list[GradientShard]) -> GradientShard:
    """Merge shards (in a multi-GPU run: after an all-gather) into one, ordered by unit id."""
    units = torch.cat([s.units for s in shards])
    order = torch.argsort(units)
    full = [s.full for s in shards if s.full is not None]
    return GradientShard(units[order], torch.cat([s.sketches.cpu() for s in shards])[order],
                         torch.cat([f.cpu() for f in full])[order] if full else None)


@contextlib.contextmanager
def differentiate_only(target: CoresetTarget) -> Iterator[None]:
    """Eval mode everywhere, gradients only for the target's layers; their weights are restored afterwards
    (the greedy search's head steps are hypothetical)."""
    modules = target.modules()
    params = [p for m in modules for p in m.parameters()]
    was = [p.requires_grad for p in params]
    chosen = layer_params(target.layers())
    saved = [p.detach().clone() for p in chosen]
    try:
        for p in params:
            p.requires_grad_(False)
        for p in chosen:
            p.requires_grad_(True)
        with eval_mode(*modules):
            yield
    finally:
        with torch.no_grad():
            for p, s in zip(chosen, saved):
                p.copy_(s)
        for p, w in zip(params, was):
            p.requires_grad_(w)


def greedy(sketches: Tensor, picks: int, val_sketch: Callable[[], Tensor], step: Callable[[int], None]) -> list[int]:
    """Pick ``picks`` rows of ``sketches`` [U, D] one at a time by largest dot product with the current validation
    sketch; after each pick but the last, ``step(row)`` updates the model and the validation sketch is recomputed."""
    chosen: list[int] = []
    g_val = val_sketch()
    sketches = sketches.to(g_val.device)  # once per round, not once per pick
    taken = torch.zeros(len(sketches), dtype=torch.bool, device=g_val.device)
    for t in range(picks):
        with fp32(g_val):  # the scores in fp32 under autocast too: bf16 rounding would tie close candidates
            scores = sketches.float() @ g_val.float()
        best = int(scores.masked_fill(taken, float("-inf")).argmax())  # selection may sync
        chosen.append(best)
        taken[best] = True
        if t < picks - 1:
            step(best)
            g_val = val_sketch()
    return chosen


def split_picks(picks: int, sizes: list[int]) -> list[int]:
    """Distribute ``picks`` over chunks proportionally to their sizes (largest remainders first)."""
    total = sum(sizes)
    exact = [picks * s / total for s in sizes]
    out = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: exact[i] - out[i], reverse=True)[: picks - sum(out)]:
        out[i] += 1
    return out


class RCS(CoresetSelector):
    """RCS: greedy selection matching training gradients to the validation RD gradient (robustness-aware)."""

    name = "rcs"
    citation = CITATION["rcs"]
    Options = RCSOptions
    needs_validation = True
    needs_target = True

    def select(self, context: SelectionContext, budget: int) -> Tensor:
        o, bs = self.options, context.batch_size
        unit = o.unit or bs
        if bs % unit:
            raise UserError(f"coreset.unit = {unit} must divide schedule.batch_size = {bs}")
        target = context.target()
        divergence = target.default_divergence if o.divergence == "auto" else o.divergence
        attack = make_attack(o.attack, "coreset", known_only=True, eps=o.eps, step_size=o.step_size, steps=o.steps,
                             clamp_start=o.clamp_start)
        device = context.images.device
        x_val = context.images[context.validation.to(device)].float() / 255
        nat_route, adv_route = target.routes
        with differentiate_only(target):
            params = layer_params(target.layers())
            start = [p.detach().clone() for p in params]
            units, shard = compute_gradients(target, context.images, context.labels, context.pool, bs, unit,
                                             context.seed, keep_full=o.head_lr > 0,
                                             shard=(rank(), world_size()))
            bank = gather(all_gather_objects(shard.cpu()))  # under torchrun: every rank's minibatches
            # what no pick changes is computed once per round: the layers below the target's are frozen, so the
            # validation images' natural features are fixed, and without reattack so are their adversarial features
            with torch.no_grad():
                f_nat = target.features(x_val, nat_route).float()
            f_adv: list[Tensor] = []

            def val_sketch() -> Tensor:
                if o.reattack or not f_adv:
                    x_adv = torch.cat([rd_attack(target, x, attack, divergence, f) for x, f in
                                       zip(x_val.split(bs), f_nat.split(bs))])
                    with torch.no_grad():
                        f_adv[:] = [target.features(x_adv, adv_route).float()]
                rd = representational_divergence(target.head(f_nat, nat_route), target.head(f_adv[0], adv_route),
                                                 divergence)
                return sketch([g.unsqueeze(0) for g in torch.autograd.grad(rd, params)])[0]

            chosen: list[int] = []
            n_units = len(bank.sketches)
            size = o.chunk or n_units
            chunks = [torch.arange(i, min(i + size, n_units)) for i in range(0, n_units, size)]
            for rows, picks in zip(chunks, split_picks(budget // unit, [len(c) for c in chunks])):
                with torch.no_grad():  # every chunk starts from the round's weights
                    for p, s in zip(params, start):
                        p.copy_(s)

                def step(row: int, rows: Tensor = rows) -> None:
                    flat = bank.full[rows[row]].to(device) * (o.head_lr * (2 if o.double_step else 1))
                    with torch.no_grad():
                        for p, g in zip(params, flat.split([p.numel() for p in params])):
                            p.sub_(g.view_as(p))
                if picks:
                    chosen += rows[greedy(bank.sketches[rows], picks, val_sketch, step)].tolist()
        return units[bank.units[chosen]].flatten()


@hookimpl
def rsslctl_coreset_selectors() -> list[type]:
    return [RCS]
