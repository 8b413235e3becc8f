"""Momentum (EMA) encoders, their momentum schedule, and predictor heads, shared by every method that bootstraps.

A momentum copy ξ of an online module θ is updated after each optimizer step as ξ ← m·ξ + (1 − m)·θ, parameters
only: its BatchNorm buffers come from its own forwards (MoCo, BYOL, DynACL's key encoder). The copy is an ordinary
sub-module of the method, so it is checkpointed with the model state and resumes exactly. The cosine schedule of
BYOL (Grill et al., NeurIPS 2020) raises m from m₀ to 1 over training; its step counter is a persistent buffer, so
it resumes exactly too. Everything here runs on the device with no host read (tests/train/test_sync.py).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module`` (no gradients) to be updated by ``ema_update``."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float | Tensor) -> None:
    """ξ ← m·ξ + (1 − m)·θ over the parameters of ``target`` (ξ) and ``online`` (θ), in one multi-tensor op.

    A Python float ``momentum`` uses ``lerp`` (ξ + (1 − m)(θ − ξ)), a 0-d tensor (a scheduled m, kept on the device so
    nothing is read back) uses ``ξ·m + θ·(1 − m)``; the two differ only by float rounding.
    """
    xi, theta = list(target.parameters()), list(online.parameters())
    if isinstance(momentum, Tensor):
        torch._foreach_mul_(xi, momentum)
        torch._foreach_add_(xi, torch._foreach_mul(theta, 1.0 - momentum))
    else:
        torch._foreach_lerp_(xi, theta, 1.0 - momentum)


def cosine_momentum(base: float, step: Tensor | int, total_steps: int) -> Tensor | float:
    """BYOL's schedule m(k) = 1 − (1 − m₀)·(cos(π·k/K) + 1)/2 for step k of K (m₀ at k = 0, 1 at k = K); ``step``
    may be a device tensor (then so is the result), and k is clamped to [0, K]."""
    if total_steps < 1:
        return base
    if isinstance(step, Tensor):
        frac = step.clamp(0, total_steps).double() / total_steps
        return (1.0 - (1.0 - base) * (torch.cos(math.pi * frac) + 1.0) / 2.0).float()
    frac = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base) * (math.cos(math.pi * frac) + 1.0) / 2.0


class MomentumSchedule(nn.Module):
    """The momentum of an EMA update: constant m₀, or BYOL's cosine from m₀ to 1 over ``total_steps`` steps.

    ``step()`` counts optimizer steps in a persistent buffer (checkpointed with the model, so resume is exact);
    ``set_total_steps`` is told the run's length before training (``Method.prepare``). With ``per_epoch`` the cosine
    runs over epochs instead and m is constant within an epoch, m = 1 − (1 − m₀)·(cos(π·(e − 1)/E) + 1)/2 in epoch
    e of E (CaCo's code): ``set_epoch`` is told the epoch (``Method.on_epoch_start``, which a resumed run calls too),
    no step is counted and nothing is stored.
    """

    def __init__(self, base: float, cosine: bool, per_epoch: bool = False) -> None:
        super().__init__()
        self.base, self.cosine, self.total_steps = float(base), bool(cosine), 0
        self.per_epoch, self.epoch_momentum = bool(per_epoch), float(base)
        if not self.per_epoch:
            self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps = int(total_steps)

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Per-epoch schedule: m for the updates of ``epoch`` (1-based) of ``total_epochs``."""
        self.epoch_momentum = float(cosine_momentum(self.base, epoch - 1, total_epochs))

    def current(self) -> float | Tensor:
        """m for the next update: a float when constant or per epoch, a 0-d device tensor when scheduled by step."""
        if not self.cosine:
            return self.base
        if self.per_epoch:
            return self.epoch_momentum
        return cosine_momentum(self.base, self.steps_done, self.total_steps)

    def step(self) -> None:
        if not self.per_epoch:
            self.steps_done.add_(1)


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, batch_norm: bool = True) -> nn.Sequential:
    """Projector/predictor MLP of BYOL: (Linear → BN → ReLU) × (layers − 1) → Linear; ``layers = 1`` is one Linear."""
    if layers < 1:
        raise ValueError(f"an MLP head needs at least one layer, got {layers}")
    mods: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(width, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if batch_norm else []),
                 nn.ReLU(inplace=True)]
        width = hidden_dim
    mods.append(nn.Linear(width, out_dim))
    return nn.Sequential(*mods)
