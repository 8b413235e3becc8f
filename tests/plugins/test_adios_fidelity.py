"""ADIOS against the authors' code (github.com/YugeTen/adios): each view through the encoder in a forward of its own,
so train-mode BatchNorm statistics are per view; ``joint_forward`` keeps the earlier interleaved 2N forward."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rsslctl_plugins.methods.adios as adios_module
from rsslctl.run.build import build_method
from rsslctl.run.recipe import load

CPU = torch.device("cpu")
ADIOS = ["attack.name='none'", "method.name='adios'", "method.num_masks=3", "method.mask_width=4"]


def _ntxent(za: torch.Tensor, zb: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's loss written out: 2N anchors [za; zb], the positive of row i is row i ± N, all others negatives."""
    z = F.normalize(torch.cat([za, zb]).float(), dim=1)
    n = za.shape[0]
    total = 0.0
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        others = torch.stack([z[a] @ z[b] / tau for b in range(2 * n) if b != a])
        total = total - (z[a] @ z[p] / tau - torch.logsumexp(others, 0))
    return total / (2 * n)


def _method(tiny_recipe: Path, extra: list[str]):
    torch.manual_seed(0)
    return build_method(load(tiny_recipe, ADIOS + extra), CPU).train()


@pytest.mark.parametrize("joint", [None, False, True], ids=["default", "per_view", "joint"])
def test_adios_loss_uses_per_view_batch_norm_by_default(tiny_recipe: Path, joint: bool | None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    method = _method(tiny_recipe, [] if joint is None else [f"method.joint_forward={str(joint).lower()}"])
    joint = bool(joint)
    g = torch.Generator().manual_seed(4)
    v1, v2 = torch.rand(6, 3, 16, 16, generator=g), torch.rand(6, 3, 16, 16, generator=g)
    views = torch.stack([v1, v2], 1).flatten(0, 1)
    monkeypatch.setattr(adios_module, "multi_view", lambda images, augment, n: views)
    with torch.no_grad():
        masks = method.occluder(v2)
        expected = 0.0
        for k in range(3):
            masked = v2 * (1 - masks[:, k:k + 1])
            if joint:  # one train-mode batch of 2N rows [v1_0, m_0, v1_1, m_1, …]
                z = method.encoder(torch.stack([v1, masked], 1).flatten(0, 1))
                za, zb = z[0::2], z[1::2]
            else:  # the authors: encoder(x_orig), encoder(x_transformed * (1 − mask)) as two forwards
                za, zb = method.encoder(v1), method.encoder(masked)
            expected = expected + _ntxent(za, zb, method.options.temperature)
        other = 0.0  # the same loss with the other forward, to show the switch matters in train mode
        for k in range(3):
            masked = v2 * (1 - masks[:, k:k + 1])
            z = method.encoder(torch.stack([v1, masked], 1).flatten(0, 1))
            sep = (method.encoder(v1), method.encoder(masked))
            other = other + (_ntxent(*sep, method.options.temperature) if joint
                             else _ntxent(z[0::2], z[1::2], method.options.temperature))
    loss, _ = method.training_step(torch.zeros(6, 3, 16, 16, dtype=torch.uint8), torch.zeros(6, dtype=torch.long))
    assert torch.allclose(loss.detach(), expected, rtol=1e-4), (float(loss), float(expected))
    assert abs(float(expected) - float(other)) > 1e-3  # BN statistics per view change the train-mode loss

