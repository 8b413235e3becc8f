"""Optimisers (SGD, Adam, AdamW, LARS) and the one per-iteration LR schedule (``LRSchedule``: linear warm-up, then
cosine, exponential, constant or multi-step)."""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Literal

import torch
from torch import Tensor

from rsslctl.nn.options import OptimizerOptions, ScheduleOptions  # noqa: F401 (re-exported)


class LARS(torch.optim.Optimizer):
    """LARS as in the ACL reference: per tensor, local = η‖w‖/(‖g‖ + wd‖w‖) (1 if a norm < 1e-15),
    buf ← μ·buf + local·lr·(g + wd·w), w ← w − buf. Uses multi-tensor (foreach) ops, no Python math per element."""

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coefficient: float = 1e-3) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd, eta, mom, lr = group["weight_decay"], group["eta"], group["momentum"], group["lr"]
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            ok = (w_norm >= 1e-15) & (g_norm >= 1e-15)
            local = torch.where(ok, eta * w_norm / (g_norm + wd * w_norm), torch.ones_like(w_norm))
            update = torch._foreach_add(grads, params, alpha=wd) if wd else [g.clone() for g in grads]
            torch._foreach_mul_(update, list((local * lr).unbind()))
            bufs = []
            for p, _u in zip(params, update):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, update)
            torch._foreach_sub_(params, bufs)


def make_optimizer(params: list[Tensor] | list[dict], o: OptimizerOptions) -> torch.optim.Optimizer:
    """The torch optimizer the ``[optimizer]`` table describes, over ``params`` (tensors, or param groups whose own
    settings override the table's)."""
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if o.name == "adamw":  # decoupled weight decay (Loshchilov & Hutter), the MAE/ViT optimiser
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return LARS(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                trust_coefficient=o.trust_coefficient)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: ScheduleOptions,
          periodic: bool = False) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``peak``, then cosine (or exponential
    decay, or nothing) to min_lr.

    With f(s) = peak·s/W for s < W, else min_lr + (peak − min_lr)·½(1 + cos(π(s − W)/(T − W))), step i runs at
    f(i + 1) when ``schedule.scheduler_step = "before"`` (a LambdaLR created at f(0) and stepped at the start of
    every iteration, as ACL/AIR/RCS). ``"after"`` (a scheduler stepped after the optimizer) runs the cosine at
    f(i) and keeps the warm-up at peak·(i + 1)/W, so no step trains at lr 0. The warm-up values are the same either
    way. ``kind = "exponential"`` replaces the cosine factor by (min_lr/peak)^t, t clipped to [0, 1]. ``periodic`` lets
    the cosine run on past ``total_steps`` (back up, down again, ...) like an over-stepped CosineAnnealingLR; only the
    reference free-AT schedule quirk uses it (see docs/methods.md, "Adversarial training and free AT").
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule.kind == "constant":
        return peak
    s = step + 1 if schedule.scheduler_step == "before" else step
    t = (s - warmup_steps) / max(1, total_steps - warmup_steps)
    lo = min(schedule.min_lr, peak)
    if schedule.kind == "exponential":  # recipe validation keeps min_lr > 0 here
        return peak * (lo / peak) ** min(1.0, max(0.0, t)) if peak > 0 else 0.0
    return lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * (t if periodic else min(1.0, t))))


@dataclasses.dataclass
class StepClock:
    """Optimizer-step bookkeeping when epochs differ in length (a coreset shrinks them after its warm-up).

    ``epoch_steps[e - 1]`` minibatches in epoch ``e``, each replayed ``replays`` times. ``step`` counts the optimizer
    steps actually taken. ``lr_position`` places a step on the LR schedule: ``by = "steps"`` spreads warm-up and
    cosine over the steps the run will really take; ``by = "epochs"`` (the RCS reference) spreads them over
    fractions of epochs, i.e. the LR of step i of epoch e is the full-data run's LR at the same epoch fraction.
    ``by = "epochs"`` counts in steps of the current epoch, as the RCS reference does when it rebuilds its schedule
    every epoch for the current loader length L (E·L steps, W·L warm-up, fast-forwarded (e − 1)·L), so ``lr_at``'s
    one-step offset is one step of that epoch. With equal epochs both equal the plain per-iteration schedule.
    """

    epoch_steps: list[int]
    replays: int = 1
    warmup_epochs: float = 0.0
    by: Literal["steps", "epochs"] = "steps"

    def __post_init__(self) -> None:
        self._offset = [0]
        for n in self.epoch_steps:
            self._offset.append(self._offset[-1] + n)

    def step(self, epoch: int, i: int, rep: int = 0) -> int:
        """0-based optimizer step of replay ``rep`` of minibatch ``i`` (0-based) in ``epoch`` (1-based)."""
        return (self._offset[epoch - 1] + i) * self.replays + rep

    @property
    def total_steps(self) -> int:
        return self._offset[-1] * self.replays

    def lr_position(self, epoch: int, i: int, rep: int = 0) -> tuple[float, float, float]:
        """(position, total, warm-up length) in the units ``lr_at`` expects."""
        if self.by == "steps":
            whole = min(int(self.warmup_epochs), len(self.epoch_steps))
            part = self.epoch_steps[whole] * (self.warmup_epochs - whole) if whole < len(self.epoch_steps) else 0
            return self.step(epoch, i, rep), self.total_steps, round((self._offset[whole] + part) * self.replays)
        per_epoch = self.epoch_steps[epoch - 1] * self.replays
        return ((epoch - 1) * per_epoch + i * self.replays + rep, len(self.epoch_steps) * per_epoch,
                round(self.warmup_epochs * per_epoch))


@dataclasses.dataclass
class LRSchedule:
    """The one learning-rate schedule of a training loop, pretraining's and ``train_classifier``'s alike: ``at``
    is the LR of optimizer step ``rep`` of minibatch ``i`` (0-based) of ``epoch`` (1-based) (``optimizer_step`` sets
    it). ``lr_at`` over ``clock``'s positions; ``kind = "multistep"``: ``peak`` × 0.1 after each of
    ``milestones`` (epochs), no warm-up; ``kind = "annealing"``: torch's CosineAnnealingLR to 0 stepped after every
    optimizer step, peak·½(1 + cos(π·step/total)) (the value ``lr_at`` gives up to rounding: written as torch
    writes it, so supervised runs keep their exact numbers). ``in_minibatches``: the free-AT reference quirk, a
    schedule sized in minibatches but stepped once per optimizer step, so the cosine runs past its end (``lr_at``'s
    ``periodic``).
    """

    peak: float
    options: ScheduleOptions
    clock: StepClock
    in_minibatches: bool = False
    kind: Literal["recipe", "multistep", "annealing"] = "recipe"
    milestones: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # the quirk's length and warm-up: the same epochs counted in minibatches (one step each)
        self._minibatches = StepClock(self.clock.epoch_steps, 1, self.clock.warmup_epochs, self.clock.by)

    @classmethod
    def per_batch(cls, peak: float, epochs: int, steps_per_epoch: int, kind: Literal["multistep", "cosine"],
                  milestones: tuple[int, ...] = ()) -> "LRSchedule":
        """A supervised loop's schedule: multi-step, or torch's CosineAnnealingLR to 0 stepped after every batch."""
        return cls(peak, ScheduleOptions(epochs=epochs, warmup_epochs=0), StepClock([steps_per_epoch] * epochs),
                   kind="multistep" if kind == "multistep" else "annealing", milestones=tuple(milestones))

    @property
    def total_steps(self) -> int:
        """Optimizer steps the run takes."""
        return self.clock.total_steps

    def position(self, epoch: int, i: int, rep: int = 0) -> tuple[float, float, float]:
        """(position, length, warm-up) of a step on the schedule, in the units ``lr_at`` expects."""
        if not self.in_minibatches:
            return self.clock.lr_position(epoch, i, rep)
        _, total, warm = self._minibatches.lr_position(epoch, i)
        return self.clock.step(epoch, i, rep), total, warm

    def at(self, epoch: int, i: int, rep: int = 0) -> float:
        if self.kind == "multistep":
            return self.peak * 0.1 ** sum(m < epoch for m in self.milestones)
        if self.kind == "annealing":
            return self.peak * 0.5 * (1 + math.cos(math.pi * self.clock.step(epoch, i, rep) / self.total_steps))
        return lr_at(*self.position(epoch, i, rep), self.peak, self.options, periodic=self.in_minibatches)
