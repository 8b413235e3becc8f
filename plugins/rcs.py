"""RCS (Xu et al., NeurIPS 2023b): robustness-aware coreset selection by greedy gradient matching (METHODS.md §5).

One round: hold the model fixed except the target's linear layers (ACL: projection head; SAT: last layer);
sketch every unit's training-loss gradient; attack the unlabeled validation set to maximise the representational
divergence (RD) and sketch its gradient; greedily pick the unit whose sketch has the largest dot product with the
validation sketch, take one SGD step on the layers with that unit's full gradient, re-attack the validation set and
recompute its gradient; repeat until the budget is filled; restore the layers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import torch
from torch import Tensor

from rsslctl import hookimpl, registry
from rsslctl.coreset import (CoresetSelector, SelectionContext, compute_gradients, differentiate_only, gather,
                             layer_params, rd_attack, representational_divergence, sketch)
from rsslctl.errors import UserError
from rsslctl.options import Number, opt, validate


@dataclasses.dataclass
class RCSOptions:
    unit: int = opt(0, "images per selection unit; 0 = one training minibatch (reference); finer units must divide "
                       "the batch size", min=0)
    head_lr: float = opt(0.01, "learning rate of the one-step layer update after each pick (Coreset_lr); "
                               "0 = no update (plain top-k by gradient match, no full gradients kept)", min=0)
    double_step: bool = opt(False, "reference behaviour: the update is applied twice (effective 2·head_lr)")
    divergence: Literal["auto", "minmax_kl", "softmax_kl"] = opt(
        "auto", "RD: minmax_kl (small-scale ACL-RCS), softmax_kl (ImageNet, SAT-RCS); auto = the target's default")
    attack: str = opt("pgd", "attack plugin maximising RD on the validation set")
    eps: Number = opt(8 / 255, "RD attack radius", min=0)
    step_size: Number = opt(2 / 153, "RD attack step (reference: (10/255)/3)", min=0)
    steps: int = opt(3, "RD attack iterations (reference: 3; ImageNet variants: 1)", min=1)
    reattack: bool = opt(True, "regenerate the adversarial validation examples after each pick (reference); "
                               "false = attack once per round, recompute only the gradient")
    chunk: int = opt(0, "greedy search locally within chunks of this many units, budget split proportionally, "
                        "layers reset after each chunk (ImageNet variant); 0 = one global search", min=0)


def greedy(sketches: Tensor, picks: int, val_sketch: Callable[[], Tensor], step: Callable[[int], None]) -> list[int]:
    """Pick ``picks`` rows of ``sketches`` [U, D] one at a time by largest dot product with the current validation
    sketch; after each pick but the last, ``step(row)`` updates the model and the validation sketch is recomputed."""
    remaining = torch.ones(len(sketches), dtype=torch.bool)
    chosen: list[int] = []
    g_val = val_sketch()
    for t in range(picks):
        gains = (sketches.to(g_val.device) @ g_val).cpu().masked_fill(~remaining, float("-inf"))
        best = int(gains.argmax())
        chosen.append(best)
        remaining[best] = False
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
        attack_cls = registry.get("attack", o.attack, "coreset.attack")
        attack = attack_cls(validate(attack_cls.Options, {"eps": o.eps, "step_size": o.step_size, "steps": o.steps},
                                     "coreset"))
        device = context.images.device
        x_val = context.images[context.validation.to(device)].float() / 255
        nat_route, adv_route = target.routes
        with differentiate_only(target):
            params = layer_params(target.layers())
            start = [p.detach().clone() for p in params]
            units, shard = compute_gradients(target, context.images, context.labels, context.pool, bs, unit,
                                             context.seed, keep_full=o.head_lr > 0)
            bank = gather([shard])  # a multi-GPU engine gathers every rank's shard here
            adv_cache: list[Tensor] = []

            def val_sketch() -> Tensor:
                if o.reattack or not adv_cache:
                    adv_cache[:] = [torch.cat([rd_attack(target, x, attack, divergence) for x in x_val.split(bs)])]
                with torch.no_grad():
                    f_nat = target.features(x_val, nat_route).float()
                    f_adv = target.features(adv_cache[0], adv_route).float()
                rd = representational_divergence(target.head(f_nat, nat_route), target.head(f_adv, adv_route),
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
