"""Random coreset: a uniform random subset of the pool, re-drawn each round (the baseline RCS is compared with)."""
from __future__ import annotations

import torch
from torch import Tensor

from rsslctl import CoresetSelector, SelectionContext, hookimpl


class RandomCoreset(CoresetSelector):
    """Uniform random subset of the training pool (the baseline for every coreset method)."""

    name = "random"

    def select(self, context: SelectionContext, budget: int) -> Tensor:
        g = torch.Generator().manual_seed(context.seed)
        return context.pool[torch.randperm(len(context.pool), generator=g)[:budget]].sort().values


@hookimpl
def rsslctl_coreset_selectors() -> list[type]:
    return [RandomCoreset]
