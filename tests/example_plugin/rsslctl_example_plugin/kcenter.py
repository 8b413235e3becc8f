"""k-center greedy coreset (Sener & Savarese, ICLR 2018) on down-sampled pixels, as a one-file selector plugin."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rsslctl import CoresetSelector, SelectionContext, hookimpl
from rsslctl_example_plugin.declared import KCenterOptions


class KCenter(CoresetSelector):
    """k-center greedy on down-sampled pixels: each pick is the image farthest from those already picked."""

    name = "kcenter"
    Options = KCenterOptions

    def select(self, context: SelectionContext, budget: int) -> Tensor:
        images = context.images[context.pool.to(context.images.device)].float()
        x = F.adaptive_avg_pool2d(images, self.options.size).flatten(1)
        first = int(torch.randint(len(x), (1,), generator=torch.Generator().manual_seed(context.seed)))
        chosen, dist = [first], (x - x[first]).norm(dim=1)
        for _ in range(budget - 1):
            nxt = int(dist.argmax())
            chosen.append(nxt)
            dist = torch.minimum(dist, (x - x[nxt]).norm(dim=1))
        return context.pool[torch.tensor(chosen)].sort().values


@hookimpl
def rsslctl_coreset_selectors() -> list[type]:
    return [KCenter]
