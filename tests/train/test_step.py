"""The one optimizer step and the one LR schedule that pretraining and ``train_classifier`` share."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rsslctl.train.classify as classify
from rsslctl.nn.optim import LRSchedule, ScheduleOptions, StepClock
from rsslctl.train.classify import LoopSettings, train_classifier
from rsslctl.train.step import optimizer_step

CPU = torch.device("cpu")


def _net_and_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), torch.randn(8, 6), torch.randint(0, 3, (8,))


@pytest.mark.parametrize("precision, clip, scale", [("fp32", 0.0, 1.0), ("bf16", 0.5, 0.75)])
def test_the_step_is_a_hand_written_autocast_backward_step(precision: str, clip: float, scale: float) -> None:
    ours, x, y = _net_and_batch()
    theirs, _, _ = _net_and_batch()
    opt_a = torch.optim.SGD(ours.parameters(), lr=1.0, momentum=0.9)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=1.0, momentum=0.9)
    for lr in (0.3, 0.1):
        loss_a, logits_a = optimizer_step(lambda: (F.cross_entropy(ours(x), y), ours(x)), opt_a,
                                          list(ours.parameters()), CPU, precision, lr=lr, scale=scale, grad_clip=clip)
        for group in opt_b.param_groups:  # the same step, written out
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss_b = F.cross_entropy(theirs(x), y)
        opt_b.zero_grad(set_to_none=True)
        (loss_b * scale).backward()
        if clip:
            nn.utils.clip_grad_norm_(list(theirs.parameters()), clip)
        opt_b.step()
        assert torch.equal(loss_a, loss_b.detach()) and not loss_a.requires_grad
        assert logits_a.shape == (8, 3)
    assert opt_a.param_groups[0]["lr"] == 0.1
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_the_supervised_schedules_are_the_formulas() -> None:
    epochs, per_epoch, peak = 3, 7, 0.2
    total = epochs * per_epoch
    cosine = LRSchedule.per_batch(peak, epochs, per_epoch, "cosine")
    got = [cosine.at(e, b) for e in range(1, epochs + 1) for b in range(per_epoch)]
    assert got == [peak * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]  # CosineAnnealingLR
    steps = LRSchedule.per_batch(peak, epochs, per_epoch, "multistep", (1, 2))
    assert [steps.at(e, 3) for e in (1, 2, 3)] == [peak, peak * 0.1, peak * 0.1 ** 2]
    assert cosine.total_steps == steps.total_steps == total


def test_the_pretraining_schedule_is_warmup_then_cosine() -> None:
    epochs, per_epoch, warm_epochs, peak, lo = 4, 5, 1, 2.0, 0.01
    sched = ScheduleOptions(epochs=epochs, warmup_epochs=warm_epochs, min_lr=lo)  # cosine, stepped before
    schedule = LRSchedule(peak, sched, StepClock([per_epoch] * epochs, 1, warm_epochs))
    total, warm = epochs * per_epoch, warm_epochs * per_epoch

    def f(s: int) -> float:  # LambdaLR's value at s; step i runs at f(i + 1), its warm-up at peak·(i + 1)/W
        return (peak * s / warm if s <= warm
                else lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))

    for i in range(total):
        assert schedule.at(1 + i // per_epoch, i % per_epoch) == pytest.approx(f(i + 1), rel=1e-12), i


def test_the_free_at_quirk_runs_the_cosine_past_its_end() -> None:
    sched = ScheduleOptions(epochs=2, warmup_epochs=0, min_lr=0.0, scheduler_step="after")
    fixed = LRSchedule(1.0, sched, StepClock([4, 4], replays=3))
    quirk = LRSchedule(1.0, sched, StepClock([4, 4], replays=3), in_minibatches=True)
    assert fixed.position(1, 0)[1] == 3 * quirk.position(1, 0)[1] == 24
    assert quirk.at(1, 2, 2) == pytest.approx(0.0, abs=1e-12)  # step 8 of a cosine 8 minibatches long: the bottom …
    assert quirk.at(2, 1, 1) == pytest.approx(1.0)  # … and back up at step 16
    assert fixed.at(2, 3, 2) < fixed.at(2, 0, 0) < fixed.at(1, 0, 0) == 1.0


@pytest.mark.parametrize("kind, milestones", [("cosine", ()), ("multistep", (1,))])
def test_train_classifier_steps_through_the_shared_step_and_schedule(kind: str, milestones: tuple,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []

    def spy(*args, **kwargs):
        seen.append(kwargs["lr"])
        return optimizer_step(*args, **kwargs)

    monkeypatch.setattr(classify, "optimizer_step", spy)
    head = nn.Linear(4, 2)
    x, y = torch.randn(10, 4), torch.arange(10) % 2
    s = LoopSettings(epochs=2, batch_size=4, lr=0.5, weight_decay=0.0, schedule=kind, milestones=milestones)
    summary = train_classifier(list(head.parameters()), x, y, lambda a, b: (F.cross_entropy(head(a), b), head(a)), s,
                               CPU)
    want = LRSchedule.per_batch(0.5, 2, 3, kind, milestones)
    assert seen == [want.at(e, b) for e in (1, 2) for b in range(3)]  # 10 images, batch 4: 3 steps an epoch
    assert summary["lr"] == seen[-1] and math.isfinite(summary["loss"])
