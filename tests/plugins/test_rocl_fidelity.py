"""RoCL against its authors' code (Kim-Minseon/RoCL), re-derived here from what that code computes: the three-view
loss is the sum of the 6N pair terms over 3N, the regulariser comes from its own train-mode forward of [x̃₁; x₂], and
``one_sided`` reaches the attack objective too."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rsslctl.run.recipe import load
from rsslctl.train.engine import Trainer
from rsslctl_plugins.methods.rocl import rocl_loss


def reference_nt_xent(outputs: torch.Tensor, views: int, tau: float, detach_columns: bool = False) -> torch.Tensor:
    """The authors' loss on block-stacked rows [v₁; v₂; (v₃)]: −log of the row-softmax (diagonal removed), the terms
    of every ordered pair of distinct views of an image summed, divided by the number of rows."""
    z = outputs / outputs.norm(dim=1, keepdim=True)
    sim = z @ (z.t().detach() if detach_columns else z.t()) / tau
    m = len(z)
    e = torch.exp(sim) * (1 - torch.eye(m, dtype=z.dtype))
    nll = torch.log(e.sum(1, keepdim=True)) - sim  # = −log(e / Σe) off the diagonal (the reference's +1e-8 left out)
    n = m // views
    total = sum(torch.diag(nll[a * n:(a + 1) * n, b * n:(b + 1) * n]).sum()
                for a in range(views) for b in range(views) if a != b)
    return total / m


def test_three_view_term_is_the_sum_of_six_n_pair_terms_over_three_n() -> None:
    torch.manual_seed(0)
    z1, z2, za, r_adv, r2 = (torch.randn(5, 6, dtype=torch.float64) for _ in range(5))
    tau, lam = 0.5, 4.0
    want = (reference_nt_xent(torch.cat((z1, z2, za)), 3, tau)
            + reference_nt_xent(torch.cat((r_adv, r2)), 2, tau) / lam)
    got = rocl_loss(z1, z2, za, tau, lam, regulariser=(r_adv, r2))
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    # without a separate regulariser forward the regulariser pairs the given z̃₁ and z₂
    want_same = (reference_nt_xent(torch.cat((z1, z2, za)), 3, tau)
                 + reference_nt_xent(torch.cat((za, z2)), 2, tau) / lam)
    torch.testing.assert_close(rocl_loss(z1, z2, za, tau, lam).double(), want_same, atol=1e-6, rtol=1e-6)


def _rocl(tiny_recipe: Path, tmp_path: Path, *extra: str) -> Trainer:
    recipe = load(tiny_recipe, ["method.name='rocl'", "schedule.epochs=1", "data.limit=16", "schedule.batch_size=8",
                                "schedule.warmup_epochs=0", "attack.steps=2", *extra])
    return Trainer(recipe, tmp_path / "run", quiet=True)


@pytest.mark.parametrize("one_sided", [False, True])
def test_attack_objective_is_one_sided_exactly_when_asked(one_sided: bool, tiny_recipe: Path, tmp_path: Path) -> None:
    method = _rocl(tiny_recipe, tmp_path, f"method.one_sided={str(one_sided).lower()}").method
    enc, seen = method.encoder, {}
    real = method.attack.perturb

    def perturb(x, objective):
        xa = x.clone().requires_grad_(True)
        seen["grad"] = torch.autograd.grad(objective(xa), xa)[0]  # inside the method's eval-mode block
        seen["x"] = x
        return real(x, objective)

    method.attack.perturb = perturb
    method.train()
    torch.manual_seed(0)
    x1, x2 = torch.rand(2, 6, 1, 16, 16)
    method.adversarial(x1, x2)
    enc.eval()

    def grad(detach_columns: bool) -> torch.Tensor:  # the authors' attack loss: NT-Xent over [f(x̃₁); f(x₂)]
        xa = seen["x"].clone().requires_grad_(True)
        loss = reference_nt_xent(torch.cat((enc(xa), enc(x2))).double(), 2, 0.5, detach_columns)
        return torch.autograd.grad(loss, xa)[0]

    want, other = grad(one_sided), grad(not one_sided)
    torch.testing.assert_close(seen["grad"].double(), want.double(), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(want, other, atol=1e-6, rtol=1e-4)  # the two objectives do differ


def test_regulariser_has_its_own_train_mode_forward(tiny_recipe: Path, tmp_path: Path) -> None:
    method = _rocl(tiny_recipe, tmp_path).method
    enc, seen = method.encoder, {}
    perturb = method.attack.perturb
    method.augment.register_forward_hook(lambda module, args, out: seen.setdefault("views", out))
    method.attack.perturb = lambda x, objective: seen.setdefault("adv", perturb(x, objective))
    method.train()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    loss, _ = method.training_step(images, torch.zeros(6, dtype=torch.long))
    x1, x2, adv = seen["views"][0::2], seen["views"][1::2], seen["adv"]
    with torch.no_grad():
        main = enc(torch.cat((x1, x2, adv))).double()
        reg = enc(torch.cat((adv, x2))).double()  # train mode: BN statistics of these 2N images only
        want = reference_nt_xent(main, 3, 0.5) + reference_nt_xent(reg, 2, 0.5) / 256.0
        shared = reference_nt_xent(main, 3, 0.5) + reference_nt_xent(torch.cat((main[12:], main[6:12])), 2, 0.5) / 256
    torch.testing.assert_close(loss.detach().double(), want, atol=1e-5, rtol=1e-5)
    assert abs(float(want - shared)) > 1e-6  # reusing the 3N forward would give another loss
