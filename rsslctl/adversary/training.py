"""Adversarial training on views, shared by methods: PGD-AT or free AT (see docs/methods.md).

* ``pgd``: the configured attack perturbs the views (input gradients only). With ``leak_attack_grads`` the
  parameter gradients of every attack step are added to the training gradient, as the CF-AMC-SSL scripts do
  by zeroing the optimizer before the attack instead of after it (reference behaviour, off by default).
* ``free`` (Shafahi et al., 2019): a persistent perturbation δ is carried across minibatches; each minibatch
  is replayed ``replays`` times on the same views; the engine's single backward fills both the parameter
  gradients and ``x_adv.grad``, from which δ takes one signed step after every optimizer step.
  By default every forward sees clip(x + δ, 0, 1), a valid image in the ε-ball of x, and δ is only kept in
  [−ε, ε] (as Shafahi et al.). ``reference_delta`` reproduces CF-AMC-SSL instead: after each step
  δ ← clip(x + δ, 0, 1) − x for the current x, and the forward uses x + δ unclipped, so the first replay of
  a new minibatch (whose δ was fitted to the previous one) sees inputs in [−ε, 1 + ε].
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rsslctl.adversary.attack import Attack
from rsslctl.adversary.options import AdvTrainingOptions  # noqa: F401 (re-exported)


class FreePerturbation:
    """Persistent δ for free adversarial training; ``inputs`` gives a leaf x+δ, ``update`` steps δ from its grad.

    ``reference = True`` is CF-AMC-SSL's order of operations (see the module docstring); the default clips every
    input to [0, 1] and leaves δ unprojected.
    """

    def __init__(self, eps: float, step: float, reference: bool = False) -> None:
        self.eps, self.step, self.reference = eps, step, reference
        self.delta: Tensor | None = None
        self.x: Tensor | None = None
        self.x_adv: Tensor | None = None

    def inputs(self, x: Tensor) -> Tensor:
        x = x.detach()
        if self.delta is None or self.delta.shape != x.shape:
            self.delta = torch.zeros_like(x)  # zeros at the first minibatch, as in the reference
        self.x = x
        x_adv = x + self.delta
        self.x_adv = (x_adv if self.reference else x_adv.clamp(0.0, 1.0)).requires_grad_(True)
        return self.x_adv

    @torch.no_grad()
    def update(self) -> None:
        """δ ← clip(δ + α·sign(∇δ), −ε, ε), using the gradient the training backward left on x+δ; in reference
        mode then δ ← clip(x + δ, 0, 1) − x."""
        if self.x_adv is None or self.x_adv.grad is None:
            return
        self.delta = (self.delta + self.step * self.x_adv.grad.sign()).clamp_(-self.eps, self.eps)
        if self.reference:
            self.delta = (self.x + self.delta).clamp_(0.0, 1.0) - self.x
        self.x_adv = None


class AdversarialTraining:
    """Mixin for a ``Method`` whose options include ``AdvTrainingOptions``; call ``setup_adversarial()`` in __init__."""

    options: AdvTrainingOptions
    attack: Attack

    def setup_adversarial(self) -> None:
        o = self.options
        free = o.training == "free"
        self.replays = o.replays if free else 1
        self.schedule_in_minibatches = free and o.reference_schedule
        step = float(getattr(self.attack.options, "step_size", self.attack.eps / 4))
        self.free = FreePerturbation(self.attack.eps, step, o.reference_delta) if free else None
        self._replay, self._views = 0, None

    def replayed(self, make: Callable[[], Tensor]) -> Tensor:
        """Fresh views on the first replay of a minibatch, the same views on the following ``replays − 1``."""
        if self._replay == 0 or self._views is None:
            self._views = make().detach()
        self._replay = (self._replay + 1) % self.replays
        return self._views

    def adversarial(self, x: Tensor, objective: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor | None]:
        """(x_adv, grad_only_term): add ``grad_only_term`` (value 0) to the loss when not None."""
        if self.free is not None:
            return self.free.inputs(x), None
        if not self.options.leak_attack_grads:
            return self.attack.perturb(x, objective), None
        params = [p for p in self.parameters() if p.requires_grad]
        leaked = [torch.zeros_like(p) for p in params]

        def leaky(xa: Tensor) -> Tensor:
            loss = objective(xa)
            grads = torch.autograd.grad(loss.float(), params, retain_graph=True, allow_unused=True)
            for acc, g in zip(leaked, grads):
                if g is not None:
                    acc.add_(g)
            return loss

        x_adv = self.attack.perturb(x, leaky)
        term = sum((p * g).sum() for p, g in zip(params, leaked))
        return x_adv, term - term.detach()

    def after_optimizer_step(self) -> None:
        if self.free is not None:
            self.free.update()

    def run_state(self) -> dict[str, Tensor]:
        """Free AT's δ persists across minibatches and epochs, so it is checkpointed for exact resume."""
        return {"free_delta": self.free.delta} if self.free is not None and self.free.delta is not None else {}

    def load_run_state(self, state: dict[str, Tensor]) -> None:
        if self.free is not None and "free_delta" in state:
            self.free.delta = state["free_delta"]
