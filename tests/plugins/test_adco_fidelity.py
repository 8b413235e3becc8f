"""AdCo (symmetric) against the authors' code (github.com/maple-research-lab/AdCo, model/AdCo.py): each view through
the query and the key encoder in a forward of its own (train-mode BatchNorm statistics per view); ``joint_forward``
keeps the earlier interleaved 2N forward."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rsslctl_plugins.methods.adco as adco_module
from rsslctl.run.build import build_method
from rsslctl.run.recipe import load

CPU = torch.device("cpu")


def _infonce(q: torch.Tensor, k: torch.Tensor, bank: torch.Tensor, tau: float) -> torch.Tensor:
    """mean_i −log e^{q_i·k_i/τ} / (e^{q_i·k_i/τ} + Σ_j e^{q_i·n_j/τ}), written out per row."""
    rows = []
    for i in range(q.shape[0]):
        logits = torch.cat([(q[i] @ k[i])[None], bank @ q[i]]) / tau
        rows.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(rows).mean()


@pytest.mark.parametrize("joint", [None, True], ids=["default", "joint"])
def test_adco_symmetric_loss_forwards_each_view_on_its_own(tiny_recipe: Path, joint: bool | None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    extra = [] if joint is None else [f"method.joint_forward={str(joint).lower()}"]
    torch.manual_seed(0)
    method = build_method(load(tiny_recipe, ["attack.name='none'", "method.name='adco'", "method.symmetric=true",
                                             "method.bank_size=24", *extra]), CPU).train()
    g = torch.Generator().manual_seed(5)
    v1, v2 = torch.rand(6, 3, 16, 16, generator=g), torch.rand(6, 3, 16, 16, generator=g)
    monkeypatch.setattr(adco_module, "multi_view", lambda images, augment, n: torch.stack([v1, v2], 1).flatten(0, 1))
    with torch.no_grad():
        method.key_encoder.load_state_dict(method.encoder.state_dict())
        for p in method.key_encoder.parameters():  # a key encoder distinct from the query encoder
            p.mul_(0.9)
        bank = F.normalize(method.bank.weight.clone(), dim=1)

        def both(net):
            if joint:
                z = net(torch.stack([v1, v2], 1).flatten(0, 1))
                return F.normalize(z[0::2], dim=1), F.normalize(z[1::2], dim=1)
            return F.normalize(net(v1), dim=1), F.normalize(net(v2), dim=1)

        (q1, q2), (k1, k2) = both(method.encoder), both(method.key_encoder)
        tau = method.options.temperature
        expected = 0.5 * _infonce(q1, k2, bank, tau) + 0.5 * _infonce(q2, k1, bank, tau)  # train.py: update_sym_network
    loss, _ = method.training_step(torch.zeros(6, 3, 16, 16, dtype=torch.uint8), torch.zeros(6, dtype=torch.long))
    assert torch.allclose(loss.detach(), expected, rtol=1e-5), (float(loss), float(expected))
