"""LARS against a naive per-tensor loop, the warm-up + cosine schedule against torch's schedulers stepped as the
references step them, and make_optimizer."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from rsslctl.nn.optim import LARS, OptimizerOptions, ScheduleOptions, lr_at, make_optimizer


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


def acl_factor(step, total, lr_max, lr_min, warm):
    """The multiplicative schedule the ACL/AIR/RCS code hands to LambdaLR (lr_max = 1, lr_min relative)."""
    if step < warm:
        return lr_max * step / warm
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos((step - warm) / (total - warm) * math.pi))


def lambda_lr_before_each_iteration(total, warm, peak, lo):
    """LR of every iteration of the ACL/AIR/RCS loop: LambdaLR built at f(0), scheduler.step() first thing in
    each iteration, then the optimizer step."""
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=peak)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about stepping the scheduler first; the reference does
        sched_ = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: acl_factor(t, total, 1, lo / peak, warm))
        out = []
        for _ in range(total):
            sched_.step()
            out.append(opt.param_groups[0]["lr"])
            opt.step()
    return out


def cosine_annealing_after_each_step(total, peak, lo):
    """LR of every iteration of the EMP-SSL/CF-AMC-SSL loop: CosineAnnealingLR stepped after the optimizer."""
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=peak)
    sched_ = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=lo)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched_.step()
    return out


@pytest.mark.parametrize("total,warm", [(100, 10), (60, 0), (37, 5)])
def test_lr_at_matches_lambda_lr_stepped_before_each_iteration(total, warm):
    peak, lo = 5.0, 1e-3
    want = lambda_lr_before_each_iteration(total, warm, peak, lo)
    s = sched(min_lr=lo)  # scheduler_step = "before" is the default
    got = [lr_at(t, total, warm, peak, s) for t in range(total)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got[-1] == pytest.approx(lo)  # the last iteration runs at min_lr, as in the reference


def test_lr_at_matches_the_reference_formula_at_i_plus_1():
    total, warm, peak, lo = 100, 10, 5.0, 1e-3
    s = sched(min_lr=lo)

    def f(x):  # the schedule value after x scheduler steps
        if x < warm:
            return peak * x / warm
        return lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * (x - warm) / (total - warm)))

    for t in range(total):
        assert lr_at(t, total, warm, peak, s) == pytest.approx(f(t + 1), rel=1e-12), t


def test_lr_at_after_matches_cosine_annealing_stepped_after_the_optimizer():
    total, peak = 50, 0.3
    s = sched(min_lr=0.0, scheduler_step="after")
    want = cosine_annealing_after_each_step(total, peak, 0.0)
    assert [lr_at(t, total, 0, peak, s) for t in range(total)] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert lr_at(0, total, 0, peak, s) == peak


def test_lr_at_after_keeps_the_warmup_and_runs_the_cosine_at_i():
    total, warm, peak, lo = 100, 10, 5.0, 1e-3
    s = sched(min_lr=lo, scheduler_step="after")
    for t in range(total + 1):
        want = (peak * (t + 1) / warm if t < warm
                else lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm))))
        assert lr_at(t, total, warm, peak, s) == pytest.approx(want, rel=1e-12), t


@pytest.mark.parametrize("when", ["before", "after"])
def test_lr_at_warmup_is_linear_and_reaches_peak(when):
    s = sched(min_lr=0.0, scheduler_step=when)
    values = [lr_at(t, 50, 5, 2.0, s) for t in range(5)]
    assert values == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])  # the same warm-up either way
    first_cosine = lr_at(5, 50, 5, 2.0, s)
    if when == "before":  # the sixth iteration is one step into the cosine
        assert first_cosine == pytest.approx(1.0 * (1 + math.cos(math.pi / 45)))
    else:
        assert first_cosine == pytest.approx(2.0)


def test_lr_at_monotone_after_warmup_and_ends_at_min_lr():
    total, warm, peak, lo = 200, 20, 5.0, 1e-6
    s = sched(min_lr=lo)
    post = [lr_at(t, total, warm, peak, s) for t in range(warm - 1, total)]
    assert post[0] == pytest.approx(peak)  # the last warm-up iteration
    assert all(b < a for a, b in zip(post, post[1:]))
    assert lr_at(total - 1, total, warm, peak, s) == pytest.approx(lo, abs=1e-15)
    assert lr_at(total + 10, total, warm, peak, s) == pytest.approx(lo, abs=1e-15)  # stays at min_lr
    assert lr_at((total + warm) // 2 - 1, total, warm, peak, s) == pytest.approx((peak + lo) / 2)


def test_lr_at_without_warmup():
    assert lr_at(0, 10, 0, 3.0, sched(min_lr=0.0, scheduler_step="after")) == pytest.approx(3.0)
    assert lr_at(0, 10, 0, 3.0, sched(min_lr=0.0)) == pytest.approx(1.5 * (1 + math.cos(math.pi / 10)))
    assert lr_at(9, 10, 0, 3.0, sched(min_lr=0.0)) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(10, 10, 0, 3.0, sched(min_lr=0.0, scheduler_step="after")) == pytest.approx(0.0, abs=1e-12)


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
    opt = make_optimizer([torch.nn.Parameter(torch.randn(3))],
                         OptimizerOptions(name="sgd", momentum=0.0, nesterov=True))
    assert opt.param_groups[0]["nesterov"] is False


def test_default_optimizer_is_lars_with_reference_hyperparameters():
    o = OptimizerOptions()
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.trust_coefficient) == ("lars", 5.0, 0.9, 1e-6, 1e-3)
