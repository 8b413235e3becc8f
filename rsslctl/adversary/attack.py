"""The attack interface (torchattacks style): every attack maximises a scalar objective of the input.

Attacks take gradients with respect to the input only (``torch.autograd.grad`` on δ), so no weight
gradients are computed or leaked into the training step. Results are clamped to [0, 1] and lie
inside the ε-ball of the chosen norm.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from rsslctl.base.options import Plugin, validate
from rsslctl.runtime.distributed import input_grad_scale

#: what an attack maximises: a function of the (perturbed) input batch returning a scalar loss
Objective = Callable[[Tensor], Tensor]


class Attack(Plugin):
    """Base class of attack plugins: ``perturb(x, objective)`` returns x_adv maximising ``objective``."""

    def __init__(self, options: Any) -> None:
        self.options = options

    def perturb(self, x: Tensor, objective: Objective) -> Tensor:
        """``objective(x_adv)`` returns a scalar to maximise (e.g. summed CE or a contrastive loss)."""
        raise NotImplementedError

    @property
    def eps(self) -> float:
        return float(getattr(self.options, "eps", 0.0))


def make_attack(name: str, where: str = "attack", known_only: bool = False, **values: Any) -> Attack:
    """The installed attack plugin ``name`` built from validated option ``values``; ``known_only`` drops values the
    attack does not take (e.g. ``steps`` for FGSM) instead of rejecting them."""
    from rsslctl.base import registry
    cls = registry.get("attack", name, where)
    if known_only:
        keys = {f.name for f in dataclasses.fields(cls.Options)}
        values = {k: v for k, v in values.items() if k in keys}
    return cls(validate(cls.Options, values, where))


# Under ``torch.compile`` (engine.compile) the leaf that an input gradient is taken against has to be made outside the
# graph: dynamo cannot return a tensor it called ``requires_grad_()`` on. So the two loops below run eagerly
# (``disable(recursive=False)``: their own frame only) and hand the leaf to functions that compile whole — objective
# forward, input gradient (dynamo's ``trace_autograd_ops``) and, for the shared loop, the projected step: one graph
# per attack step, the same graph every step.
@torch.compiler.disable(recursive=False)
def input_grad(objective: Objective, x_adv: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, ∂loss/∂x_adv): the objective is evaluated in fp32 and differentiated w.r.t. the input only."""
    return loss_and_grad(objective, x_adv.detach().requires_grad_(True))


def loss_and_grad(objective: Objective, leaf: Tensor) -> tuple[Tensor, Tensor]:
    """(objective(leaf) in fp32, its gradient w.r.t. the leaf tensor ``leaf``), nothing else differentiated.

    In a data-parallel step the objective may gather across ranks, and autograd then returns the gradient of the sum
    of the ranks' objectives; ``input_grad_scale`` makes it the gradient of the global objective (their mean) w.r.t.
    this rank's own inputs, as a single process on the global batch computes it."""
    loss = objective(leaf).float()
    (grad,) = torch.autograd.grad(loss, leaf)
    scale = input_grad_scale()
    return loss.detach(), grad if scale == 1.0 else grad * scale


def _norms(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def ascent_step(grad: Tensor, step: float, norm: str) -> Tensor:
    """Steepest-ascent direction for the norm, scaled by ``step``."""
    if norm == "linf":
        return step * grad.sign()
    return step * grad / _norms(grad)


def project(x: Tensor, x_adv: Tensor, eps: float, norm: str) -> Tensor:
    """Project ``x_adv`` onto the ε-ball around ``x`` intersected with the [0, 1] box."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _norms(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


@torch.compiler.disable(recursive=False)
def projected_ascent(x: Tensor, x_adv: Tensor, objective: Objective, step: float, steps: int, eps: float,
                     norm: str) -> Tensor:
    """``steps`` steepest-ascent steps on ``objective`` from ``x_adv``, each projected onto the ε-ball around ``x``
    intersected with [0, 1] (the loop shared by PGD, FGSM and the TRADES adversaries)."""
    for _ in range(steps):
        x_adv = projected_step(objective, x, x_adv.detach().requires_grad_(True), step, eps, norm)
    return x_adv.detach()


def projected_step(objective: Objective, x: Tensor, leaf: Tensor, step: float, eps: float, norm: str) -> Tensor:
    """One step of ``projected_ascent`` from the leaf tensor ``leaf`` (one compiled graph under engine.compile)."""
    _, grad = loss_and_grad(objective, leaf)
    return project(x, leaf.detach() + ascent_step(grad, step, norm), eps, norm)


def random_start(x: Tensor, eps: float, norm: str) -> Tensor:
    """A uniform random point in the ε-ball (L∞: per pixel; L2: uniform in the ball)."""
    if norm == "linf":
        return x + torch.empty_like(x).uniform_(-eps, eps)
    d = torch.randn_like(x)
    n = x[0].numel()
    r = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype) ** (1.0 / n)
    return x + eps * r * d / _norms(d)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Temporarily switch modules to eval mode (BN running stats), restoring their previous mode."""
    was = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, w in zip(modules, was):
            m.train(w)
