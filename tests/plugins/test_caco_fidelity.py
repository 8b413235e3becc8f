"""CaCo against the authors' code (github.com/maple-research-lab/CaCo, model/CaCo.py, training/train_caco.py): each
view through the query and the key encoder in a forward of its own (train-mode BatchNorm statistics per view;
``joint_forward`` keeps the earlier interleaved 2N forward)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import final_checkpoint, kill_and_resume, train_run

import rsslctl_plugins.methods.caco as caco_module
from rsslctl.run.build import build_method
from rsslctl.run.recipe import load

CPU = torch.device("cpu")
CACO = ["attack.name='none'", "method.name='caco'", "method.bank_size=24"]


def _ce_against_bank(q: torch.Tensor, key_other: torch.Tensor, bank: torch.Tensor, tau: float) -> torch.Tensor:
    """mean_i −log softmax(q_i·nᵀ/τ)[y_i] with y_i = argmax_j key_i·n_j, written out per row."""
    rows = []
    for i in range(q.shape[0]):
        y = int(torch.argmax(bank @ key_other[i]))
        logits = bank @ q[i] / tau
        rows.append(torch.logsumexp(logits, 0) - logits[y])
    return torch.stack(rows).mean()


@pytest.mark.parametrize("joint", [None, False, True], ids=["default", "per_view", "joint"])
def test_caco_loss_forwards_each_view_on_its_own(tiny_recipe: Path, joint: bool | None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    extra = [] if joint is None else [f"method.joint_forward={str(joint).lower()}"]
    torch.manual_seed(0)
    method = build_method(load(tiny_recipe, CACO + extra), CPU).train()
    g = torch.Generator().manual_seed(6)
    v1, v2 = torch.rand(6, 3, 16, 16, generator=g), torch.rand(6, 3, 16, 16, generator=g)
    monkeypatch.setattr(caco_module, "multi_view", lambda images, augment, n: torch.stack([v1, v2], 1).flatten(0, 1))
    with torch.no_grad():
        for p in method.key_encoder.parameters():  # a key encoder distinct from the query encoder
            p.mul_(0.9)
        bank = F.normalize(method.bank.weight.clone(), dim=1)

        def both(net, joint_batch: bool):
            if joint_batch:
                z = net(torch.stack([v1, v2], 1).flatten(0, 1))
                return F.normalize(z[0::2], dim=1), F.normalize(z[1::2], dim=1)
            return F.normalize(net(v1), dim=1), F.normalize(net(v2), dim=1)

        def loss_of(joint_batch: bool) -> torch.Tensor:  # train_caco.py, update_sym_network: the two CEs summed
            (q1, q2), (k1, k2) = both(method.encoder, joint_batch), both(method.key_encoder, joint_batch)
            tau = method.options.temperature
            return _ce_against_bank(q1, k2, bank, tau) + _ce_against_bank(q2, k1, bank, tau)

        expected, other = loss_of(bool(joint)), loss_of(not joint)
    loss, _ = method.training_step(torch.zeros(6, 3, 16, 16, dtype=torch.uint8), torch.zeros(6, dtype=torch.long))
    assert torch.allclose(loss.detach(), expected, rtol=1e-5), (float(loss), float(expected))
    assert abs(float(expected) - float(other)) > 1e-4  # BN statistics per view change the train-mode loss


# -- the key encoder's momentum: the authors' --moco_m_decay 1 (main_worker.py, adjust_moco_momentum) ----------------
@pytest.mark.parametrize("cosine", [None, False], ids=["default", "constant"])
def test_caco_key_momentum_follows_the_authors_cosine_over_epochs(tiny_recipe: Path, cosine: bool | None) -> None:
    import math
    extra = [] if cosine is None else ["method.cosine_momentum=false"]
    torch.manual_seed(0)
    method = build_method(load(tiny_recipe, CACO + ["method.momentum=0.9", *extra]), CPU)
    total = 5
    for epoch in range(1, total + 1):
        method.on_epoch_start(epoch, total)
        t = epoch - 1  # the authors count epochs from 0
        expected = 1 - (1 - 0.9) * (math.cos(math.pi * t / total) + 1) / 2 if cosine is None else 0.9
        m = method.key_momentum()
        assert m == pytest.approx(expected, abs=1e-12), (epoch, m, expected)
    # the update after an optimizer step uses it: ξ ← m·ξ + (1 − m)·θ
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(0.01)
    before = [p.clone() for p in method.key_encoder.parameters()]
    online = [p.clone() for p in method.encoder.parameters()]
    method.after_optimizer_step()
    for xi, old, theta in zip(method.key_encoder.parameters(), before, online):
        assert torch.allclose(xi, m * old + (1 - m) * theta, atol=1e-6)


def test_caco_with_the_momentum_schedule_resumes_exactly(tiny_recipe: Path, tmp_path: Path) -> None:
    recipe = load(tiny_recipe, CACO + ["schedule.epochs=3", "data.limit=32", "schedule.batch_size=8",
                                       "method.momentum=0.5", "method.bank_warmup_epochs=1"])
    train_run(recipe, tmp_path / "full")
    # step 9: 4 steps per epoch, epoch 3 started, epochs 1-2 checkpointed
    kill_and_resume(recipe, tmp_path / "broken", 9, reference=tmp_path / "full")
    # the per-epoch schedule adds nothing to the checkpoint
    assert not any("schedule" in k for k in final_checkpoint(tmp_path / "full")[0])
