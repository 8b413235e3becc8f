"""PGD (L∞/L2, random start on/off), FGSM and FGSM-RS on a tiny conv net: constraints, strength, no weight grads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rsslctl.adversary.attack import eval_mode, project, random_start
from rsslctl.base.options import validate
from rsslctl.nn.losses import nt_xent
from rsslctl_plugins.attacks.fgsm import FGSM, FGSMOptions
from rsslctl_plugins.attacks.pgd import PGD, PGDOptions

N = 8


def tiny_net(seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, classes),
    )
    with torch.no_grad():
        net[-1].weight.mul_(10.0)  # sharper logits, so an ε-ball perturbation visibly changes the loss
    return net


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (N,), generator=g)
    return x, y


def ce_objective(model, y):
    return lambda xa: F.cross_entropy(model(xa), y, reduction="sum")


def pgd(**kw) -> PGD:
    return PGD(PGDOptions(**kw))


def fgsm(**kw) -> FGSM:
    return FGSM(FGSMOptions(**kw))


@pytest.fixture
def setup():
    model = tiny_net().eval()
    x, y = data()
    return model, x, y, ce_objective(model, y)


def l2(delta):
    return delta.flatten(1).norm(dim=1)


ATTACKS = {
    "pgd-linf": lambda: pgd(eps=8 / 255, step_size=2 / 255, steps=10, norm="linf"),
    "pgd-linf-nors": lambda: pgd(eps=8 / 255, step_size=2 / 255, steps=10, norm="linf", random_start=False),
    "pgd-linf-noclamp": lambda: pgd(eps=8 / 255, step_size=2 / 255, steps=3, norm="linf", clamp_start=False),
    "pgd-l2": lambda: pgd(eps=0.5, step_size=0.1, steps=10, norm="l2"),
    "pgd-l2-nors": lambda: pgd(eps=0.5, step_size=0.1, steps=10, norm="l2", random_start=False),
    "fgsm": lambda: fgsm(eps=8 / 255),
    "fgsm-rs": lambda: fgsm(eps=8 / 255, random_start=True),
    "fgsm-l2": lambda: fgsm(eps=0.5, norm="l2"),
    "pgd-big-step": lambda: pgd(eps=4 / 255, step_size=0.5, steps=2, norm="linf"),
    "pgd-l2-big-step": lambda: pgd(eps=0.3, step_size=5.0, steps=2, norm="l2"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_stays_in_ball_and_box(setup, name):
    model, x, y, obj = setup
    torch.manual_seed(1)
    attack = ATTACKS[name]()
    x_adv = attack.perturb(x, obj)
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert not x_adv.requires_grad
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    eps = attack.options.eps
    if attack.options.norm == "linf":
        assert (x_adv - x).abs().max() <= eps + 1e-6
    else:
        assert (l2(x_adv - x) <= eps + 1e-5).all()
    assert (x_adv - x).abs().max() > 0  # it did move


@pytest.mark.parametrize("name", list(ATTACKS))
def test_increases_objective(setup, name):
    model, x, y, obj = setup
    torch.manual_seed(2)
    attack = ATTACKS[name]()
    with torch.no_grad():
        clean = obj(x).item()
    x_adv = attack.perturb(x, obj)
    with torch.no_grad():
        adv = obj(x_adv).item()
        eps = attack.options.eps
        rand = []
        for _ in range(5):
            xr = project(x, random_start(x, eps, attack.options.norm), eps, attack.options.norm)
            rand.append(obj(xr).item())
    assert adv > clean + 0.2
    assert adv > max(rand) + 0.2


def test_more_pgd_steps_do_not_weaken(setup):
    model, x, y, obj = setup
    torch.manual_seed(3)
    x10 = pgd(eps=8 / 255, step_size=2 / 255, steps=10).perturb(x, obj)
    x1 = pgd(eps=8 / 255, step_size=2 / 255, steps=1).perturb(x, obj)
    xf = fgsm(eps=8 / 255).perturb(x, obj)
    with torch.no_grad():
        l10, l1, lf = obj(x10).item(), obj(x1).item(), obj(xf).item()
    assert l10 >= lf - 0.05 * abs(lf)
    assert l10 > l1


def test_pgd_linf_without_random_start_is_deterministic_and_first_step_is_fgsm(setup):
    model, x, y, obj = setup
    a = pgd(eps=8 / 255, step_size=2 / 255, steps=4, random_start=False).perturb(x, obj)
    b = pgd(eps=8 / 255, step_size=2 / 255, steps=4, random_start=False).perturb(x, obj)
    assert torch.equal(a, b)
    one = pgd(eps=8 / 255, step_size=8 / 255, steps=1, random_start=False).perturb(x, obj)
    torch.testing.assert_close(one, fgsm(eps=8 / 255).perturb(x, obj))
    # an FGSM L∞ step moves every pixel by ±ε unless clipped by the [0, 1] box (or a zero gradient)
    xa = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(obj(xa), xa)
    expected = (x + 8 / 255 * grad.sign()).clamp(0, 1)
    torch.testing.assert_close(one, expected)


def test_random_start_differs_between_seeds(setup):
    model, x, y, obj = setup
    attack = pgd(eps=8 / 255, step_size=2 / 255, steps=1)
    torch.manual_seed(10)
    a = attack.perturb(x, obj)
    torch.manual_seed(11)
    b = attack.perturb(x, obj)
    torch.manual_seed(10)
    c = attack.perturb(x, obj)
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_fgsm_rs_default_step_is_1_25_eps():
    # with a linear objective Σ x (gradient all ones), FGSM-RS moves every pixel by +1.25ε from its random start
    x = torch.full((2, 3, 4, 4), 0.5)
    obj = lambda xa: xa.sum()  # noqa: E731
    eps = 0.1
    torch.manual_seed(0)
    start = random_start(x.float(), eps, "linf").clamp(0, 1)
    torch.manual_seed(0)
    out = fgsm(eps=eps, random_start=True).perturb(x, obj)
    torch.testing.assert_close(out, project(x, start + 1.25 * eps, eps, "linf"))
    assert (out - x).min() > 0.25 * eps - 1e-6  # start ≥ −ε, then +1.25ε
    plain = fgsm(eps=eps).perturb(x, obj)
    torch.testing.assert_close(plain, x + eps)


def test_random_start_l2_is_inside_ball():
    x = torch.rand(64, 3, 4, 4)
    torch.manual_seed(0)
    d = random_start(x, 0.5, "l2") - x
    norms = l2(d)
    assert (norms <= 0.5 + 1e-5).all() and norms.min() > 0.3  # uniform in a 48-dim ball: mass near the surface
    d = random_start(x, 0.1, "linf") - x
    assert d.abs().max() <= 0.1 and d.abs().max() > 0.09


def test_no_parameter_gradients(setup):
    model, x, y, obj = setup
    for attack in (pgd(steps=3), pgd(steps=2, norm="l2", eps=0.5, step_size=0.2), fgsm(), fgsm(random_start=True)):
        attack.perturb(x, obj)
        assert all(p.grad is None for p in model.parameters())


def test_eval_mode_model_and_mode_unchanged(setup):
    model, x, y, obj = setup
    stats = model[1].running_mean.clone()
    pgd(steps=3).perturb(x, obj)
    assert not model.training and not any(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, stats)  # eval mode: BN statistics untouched
    model.train()
    pgd(steps=2).perturb(x, obj)
    assert model.training  # the attack does not switch modes itself


def test_eval_mode_context_manager_restores_flags():
    a, b = tiny_net().train(), tiny_net().eval()
    with eval_mode(a, b):
        assert not a.training and not b.training
        assert not any(m.training for m in a.modules())
    assert a.training and all(m.training for m in a.modules())
    assert not b.training
    with pytest.raises(RuntimeError):
        with eval_mode(a):
            raise RuntimeError("boom")
    assert a.training


def test_eval_mode_during_attack_uses_running_stats():
    model = tiny_net().train()
    x, y = data()
    stats = model[1].running_mean.clone()
    with eval_mode(model):
        x_adv = pgd(steps=2).perturb(x, ce_objective(model, y))
    assert model.training
    assert torch.equal(model[1].running_mean, stats)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6


def test_contrastive_objective():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 16)).eval()
    g = torch.Generator().manual_seed(5)
    base = torch.rand(4, 3, 16, 16, generator=g)
    views = (base.repeat_interleave(2, 0) + 0.02 * torch.randn(8, 3, 16, 16, generator=g)).clamp(0, 1)
    obj = lambda xa: nt_xent(model(xa), 0.5)  # noqa: E731
    torch.manual_seed(1)
    adv = pgd(eps=8 / 255, step_size=2 / 255, steps=5).perturb(views, obj)
    with torch.no_grad():
        assert obj(adv).item() > obj(views).item() + 1e-3
    assert (adv - views).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())


def test_eps_fraction_string_parses():
    o = validate(PGDOptions, {"eps": "8/255", "step_size": "2/255", "steps": 7}, "attack")
    assert o.eps == 8 / 255 and o.step_size == 2 / 255 and o.steps == 7
    assert PGD(o).eps == pytest.approx(8 / 255)
    fo = validate(FGSMOptions, {"eps": "4 / 255"}, "attack")
    assert fo.eps == 4 / 255


def test_pgd_options_defaults_are_reference():
    o = PGDOptions()
    assert (o.eps, o.step_size, o.steps, o.norm, o.random_start) == (8 / 255, 2 / 255, 5, "linf", True)


