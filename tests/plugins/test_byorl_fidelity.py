"""BYORL has no public code; it follows BYOL's official code (google-deepmind/deepmind-research, byol_experiment.py):
the two directions' regression losses are summed, and each view goes through the online and the target network in a
forward of its own (train-mode BatchNorm statistics per view). Switches keep the earlier mean / joint forward."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rsslctl_plugins.methods.byorl as byorl_module
from rsslctl.run.build import build_method
from rsslctl.run.recipe import load

CPU = torch.device("cpu")


def _regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean_i ‖p_i/‖p_i‖ − z_i/‖z_i‖‖² (BYOL's regression loss, written as the squared distance)."""
    pn, zn = p / p.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    return ((pn - zn) ** 2).sum(1).mean()


@pytest.mark.parametrize("extra, joint, scale", [
    ([], False, 1.0),
    (["method.average_directions=true"], False, 0.5),
    (["method.joint_forward=true"], True, 1.0),
], ids=["default", "average_directions", "joint_forward"])
def test_byorl_loss_is_the_sum_of_both_directions_from_per_view_forwards(
        tiny_recipe: Path, extra: list[str], joint: bool, scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    method = build_method(load(tiny_recipe, ["method.name='byorl'", "method.pred_hidden=16", *extra]), CPU).train()
    g = torch.Generator().manual_seed(7)
    v1, v2 = torch.rand(6, 3, 16, 16, generator=g), torch.rand(6, 3, 16, 16, generator=g)
    monkeypatch.setattr(byorl_module, "multi_view", lambda images, augment, n: torch.stack([v1, v2], 1).flatten(0, 1))
    monkeypatch.setattr(method.attack, "perturb", lambda x, objective: x.detach())  # the loss, not the attack, here
    with torch.no_grad():
        for p in method.target.parameters():  # a target distinct from the online network
            p.mul_(0.9)

        def both(net):
            if joint:
                out = net(torch.stack([v1, v2], 1).flatten(0, 1))
                return out[0::2], out[1::2]
            return net(v1), net(v2)

        z1, z2 = both(method.target)
        q1, q2 = both(lambda x: method.predictor(method.encoder(x)))
        expected = scale * (_regression(q1, z2) + _regression(q2, z1))
    loss, _ = method.training_step(torch.zeros(6, 3, 16, 16, dtype=torch.uint8), torch.zeros(6, dtype=torch.long))
    assert torch.allclose(loss.detach(), expected, rtol=1e-5), (float(loss), float(expected))
