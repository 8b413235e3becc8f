"""LARS against a naive per-tensor loop, the warm-up + cosine schedule and make_optimizer."""
from __future__ import annotations

import math

import pytest
import torch

from rsslctl.optim import LARS, OptimizerOptions, ScheduleOptions, lr_at, make_optimizer


def naive_lars_step(params, grads, bufs, lr, momentum, wd, eta):
    """Reference LARS, one tensor at a time, float64 norms computed with Python math."""
    for i, (w, g) in enumerate(zip(params, grads)):
        w_norm = math.sqrt(float((w.double() ** 2).sum()))
        g_norm = math.sqrt(float((g.double() ** 2).sum()))
        if w_norm < 1e-15 or g_norm < 1e-15:
            local = 1.0
        else:
            local = eta * w_norm / (g_norm + wd * w_norm)
        bufs[i] = momentum * bufs[i] + local * lr * (g + wd * w)
        params[i] = w - bufs[i]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(4, 3, generator=g),
        torch.randn(5, generator=g) * 0.01,
        torch.zeros(3),  # ‖w‖ = 0 → local = 1
        torch.randn(2, 2, 2, generator=g) * 5,
        torch.randn(6, generator=g),  # gets a zero gradient on some steps → local = 1
    ]


@pytest.mark.parametrize("wd", [1e-6, 1e-2, 0.0])
def test_lars_matches_naive_reference(wd):
    init = make_params()
    params = [torch.nn.Parameter(p.clone()) for p in init]
    lr0, momentum, eta = 5.0, 0.9, 1e-3
    opt = LARS(params, lr=lr0, momentum=momentum, weight_decay=wd, trust_coefficient=eta)
    ref = [p.clone().double() for p in init]
    bufs = [torch.zeros_like(p) for p in ref]
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        lr = lr0 * (step + 1) / 5  # the engine changes the lr between steps
        for group in opt.param_groups:
            group["lr"] = lr
        grads = [torch.randn(p.shape, generator=g) * (10.0 ** (i - 2)) for i, p in enumerate(init)]
        if step % 2 == 0:
            grads[4] = torch.zeros(6)
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        naive_lars_step(ref, [gr.double() for gr in grads], bufs, lr, momentum, wd, eta)
        for i, (p, r) in enumerate(zip(params, ref)):
            torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-7, msg=f"step {step} tensor {i}")
    # the zero tensor only moved because local = 1 was used (lr·g is large compared with η-scaled updates)
    assert params[2].detach().abs().max() > 1e-3


def test_lars_local_lr_is_one_for_zero_weights():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = LARS([w], lr=0.5, momentum=0.0, weight_decay=0.0, trust_coefficient=1e-3)
    w.grad = torch.tensor([1.0, -2.0, 0.5, 0.0])
    opt.step()
    torch.testing.assert_close(w.detach(), -0.5 * torch.tensor([1.0, -2.0, 0.5, 0.0]))


def test_lars_trust_ratio_for_nonzero_tensor():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ‖w‖ = 5
    opt = LARS([w], lr=2.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.1)
    w.grad = torch.tensor([0.0, 1.0])  # ‖g‖ = 1
    opt.step()
    # local = 0.1·5/1 = 0.5; buf = 0.5·2·g
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 3.0]))
    w.grad = torch.tensor([0.0, 1.0])
    opt.step()
    # ‖w‖ = √18; local = 0.1·√18; buf = 0.9·[0,1] + 0.1·√18·2·[0,1]
    expected = 3.0 - (0.9 + 0.2 * math.sqrt(18))
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, expected]))


def test_lars_skips_params_without_grad():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = LARS([a, b], lr=1.0)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and "momentum_buffer" not in opt.state[b]
    assert not torch.equal(a.detach(), torch.ones(3))


def sched(**kw) -> ScheduleOptions:
    return ScheduleOptions(**kw)


def reference_lr(t, total, warm, lr_max, lr_min):
    if t < warm:
        return lr_max * (t + 1) / warm
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))


def test_lr_at_matches_reference_formula():
    total, warm, peak, lo = 100, 10, 5.0, 1e-3
    s = sched(min_lr=lo)
    for t in range(total + 1):
        assert lr_at(t, total, warm, peak, s) == pytest.approx(reference_lr(t, total, warm, peak, lo), rel=1e-12), t


def test_lr_at_warmup_is_linear_and_reaches_peak():
    s = sched(min_lr=0.0)
    values = [lr_at(t, 50, 5, 2.0, s) for t in range(5)]
    assert values == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])
    assert lr_at(5, 50, 5, 2.0, s) == pytest.approx(2.0)  # first post-warm-up step = peak


def test_lr_at_monotone_after_warmup_and_ends_at_min_lr():
    total, warm, peak, lo = 200, 20, 5.0, 1e-6
    s = sched(min_lr=lo)
    post = [lr_at(t, total, warm, peak, s) for t in range(warm, total + 1)]
    assert all(b < a for a, b in zip(post, post[1:]))
    assert lr_at(total, total, warm, peak, s) == pytest.approx(lo, abs=1e-15)
    assert lr_at(total + 10, total, warm, peak, s) == pytest.approx(lo, abs=1e-15)  # stays at min_lr
    assert lr_at((total + warm) // 2, total, warm, peak, s) == pytest.approx((peak + lo) / 2)


def test_lr_at_without_warmup_starts_at_peak():
    s = sched(min_lr=0.0)
    assert lr_at(0, 10, 0, 3.0, s) == pytest.approx(3.0)
    assert lr_at(10, 10, 0, 3.0, s) == pytest.approx(0.0, abs=1e-12)


def test_lr_at_constant_kind():
    s = sched(kind="constant", min_lr=1e-3)
    assert [lr_at(t, 20, 4, 1.0, s) for t in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(lr_at(t, 20, 4, 1.0, s) == 1.0 for t in range(4, 25))


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("lars", LARS)])
def test_make_optimizer_by_name(name, cls):
    params = [torch.nn.Parameter(torch.randn(3))]
    o = OptimizerOptions(name=name, lr=0.25, momentum=0.8, weight_decay=1e-4, nesterov=True, betas=(0.5, 0.6))
    opt = make_optimizer(params, o)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.25 and group["weight_decay"] == 1e-4
    assert group["params"][0] is params[0]
    if name == "sgd":
        assert group["momentum"] == 0.8 and group["nesterov"] is True
    elif name == "adam":
        assert tuple(group["betas"]) == (0.5, 0.6)
    else:
        assert group["momentum"] == 0.8 and group["eta"] == o.trust_coefficient


def test_make_optimizer_sgd_nesterov_needs_momentum():
    opt = make_optimizer([torch.nn.Parameter(torch.randn(3))], OptimizerOptions(name="sgd", momentum=0.0, nesterov=True))
    assert opt.param_groups[0]["nesterov"] is False


def test_default_optimizer_is_lars_with_reference_hyperparameters():
    o = OptimizerOptions()
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.trust_coefficient) == ("lars", 5.0, 0.9, 1e-6, 1e-3)
