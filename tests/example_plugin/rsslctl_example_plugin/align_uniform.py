"""Alignment + uniformity (Wang & Isola, 2020) as a one-file rsslctl method plugin."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rsslctl import Method, hookimpl, multi_view
from rsslctl_example_plugin.declared import AlignUniformOptions


class AlignUniform(Method):
    """Alignment-uniformity loss on two views (example third-party method)."""

    name = "align_uniform"
    Options = AlignUniformOptions

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = F.normalize(self.encoder(multi_view(images, self.augment, 2)).float(), dim=1)
        a, b = z[0::2], z[1::2]
        align = (a - b).norm(dim=1).pow(self.options.alpha).mean()
        uniform = torch.pdist(z).pow(2).mul(-self.options.t).exp().mean().log()
        loss = align + self.options.weight * uniform
        return loss, {"align": align.detach(), "uniform": uniform.detach()}


@hookimpl
def rsslctl_methods() -> list[type]:
    return [AlignUniform]
