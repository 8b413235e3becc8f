"""The options adversarial training mixes into a method's Options, torch-free (recipe validation reads them)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from rsslctl.base.options import opt


@dataclasses.dataclass
class AdvTrainingOptions:
    """Options mixed into a method's Options dataclass."""

    training: Literal["pgd", "free"] = opt("pgd", "pgd: attack the views every step (PGD-AT); "
                                                  "free: persistent δ, each minibatch replayed `replays` times")
    replays: int = opt(3, "free AT: optimizer steps per minibatch (m)", min=1)
    leak_attack_grads: bool = opt(False, "pgd: add the attack steps' weight gradients to the update "
                                         "(reference CF-AMC-SSL bug, for parity only)")
    reference_schedule: bool = opt(False, "free: LR schedule length counted in minibatches, so the cosine runs "
                                          "m half-periods (reference CF-AMC-SSL quirk, for parity only)")
    reference_delta: bool = opt(False, "free: feed x+δ unclipped and re-project δ ← clip(x+δ, 0, 1) − x after each "
                                       "step, so a new minibatch's inputs range over [−ε, 1+ε] (reference CF-AMC-SSL, "
                                       "for parity only); false = clip(x+δ, 0, 1) at every forward")
