"""Memory shared across iterations by contrastive methods: a FIFO negative queue and a learnable memory bank.

* ``NegativeQueue`` (MoCo, He et al., CVPR 2020): the keys of the last K images, oldest replaced first. Its vectors
  and write pointer are module buffers, so they live in the method's state dict and a checkpoint restores them
  bit for bit. The pointer is a device tensor and the write an ``index_copy_``: pushing never syncs the host.
* ``LearnableBank`` (AdCo, Hu et al., CVPR 2021; CaCo, Wang et al., 2022): K free vectors, used unit-normalised,
  updated by their own SGD (own learning rate, momentum and weight decay) in the direction a method records each
  step — ascent on the contrastive loss for adversarial negatives, descent for cooperative positives.

Why the bank has its own optimizer instead of a param group of the engine's: the engine sets one learning rate on
every group from its schedule and applies the encoder's weight decay / LARS trust ratio, while the papers' bank
runs at a fixed, much larger rate (AdCo: 3.0 against the encoder's 0.03) with its own temperature and sign per
vector. Its vectors are a ``Parameter`` with ``requires_grad = False`` — in the state dict like any weight, but
invisible to the engine's optimizer and to the encoder loss's backward — and its optimizer state (the momentum
buffer) travels in the method's run state, so a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsslctl.method.base import Method
from rsslctl.nn.losses import fp32, pair_rows
from rsslctl.nn.momentum import ema_update, momentum_copy
from rsslctl.runtime.checkpoint import load_optimizer_tensors, optimizer_tensors
from rsslctl.runtime.distributed import all_reduce_with_grad, collective, gather_with_grad, world_size


class NegativeQueue(nn.Module):
    """FIFO queue of ``size`` unit vectors of dimension ``dim`` (MoCo's dictionary), initialised to random unit
    vectors (as MoCo) from the global RNG."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def snapshot(self) -> Tensor:
        """A detached copy [K, D] for this step's logits: the loss's backward must not see the push that follows."""
        return self.keys.detach().clone()

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        """Enqueue ``keys`` [B, D] over the oldest entries; with B > K only the newest K are kept. No host sync.
        In a data-parallel step every rank enqueues the keys of all ranks (rank order), as MoCo does."""
        keys = gather_with_grad(keys.detach())[-self.size:].to(self.keys.dtype)
        idx = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % self.size
        self.keys.index_copy_(0, idx, keys)
        self.ptr.copy_((self.ptr + keys.shape[0]) % self.size)


def softmax_logit_grad(logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """∂/∂l of mean_i CE(l_i / t, y_i) for raw logits l [N, C]: (softmax(l/t) − onehot(y)) / (N·t), in fp32."""
    p = torch.softmax(logits.detach().float() / temperature, dim=1)
    onehot = torch.zeros_like(p).scatter_(1, labels[:, None], 1.0)  # scatter, not F.one_hot: no range check/sync
    return (p - onehot) / (p.shape[0] * temperature)


def normalized_rows_grad(q: Tensor, weight: Tensor, logit_grad: Tensor) -> Tensor:
    """∂/∂W of Σ_ij G_ij · l_ij with l = q · normalize(W)ᵀ (q [N, D], W [K, D], G [N, K]), in closed form:

    with n_j = w_j/‖w_j‖:  ∂/∂w_j = (Σ_i G_ij q_i − n_j Σ_i G_ij l_ij) / ‖w_j‖ — the gradient with respect to n_j,
    projected onto the tangent space of the sphere at n_j and scaled by 1/‖w_j‖. No autograd, so it also runs
    inside a compiled step."""
    q, w, g = q.detach().float(), weight.detach().float(), logit_grad.float()
    with fp32(q):  # under bf16 autocast the matmuls would round the bank's update
        norm = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        n = w / norm
        logits = q @ n.t()
        return (g.t() @ q - n * (g * logits).sum(0)[:, None]) / norm


class LearnableBank(nn.Module):
    """``size`` learnable vectors [K, D] (AdCo's adversarial negatives, CaCo's positives and negatives).

    Each step the method records an ascent direction with ``record`` (computed in its training step from the
    step's queries); ``step`` — called from ``after_optimizer_step``, after the encoder's update as in the
    papers — moves the vectors along it with the bank's own SGD. ``fill`` copies keys into the rows not yet
    filled (the references initialise the bank with the first keys of training)."""

    def __init__(self, size: int, dim: int, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(size, dim), dim=1), requires_grad=False)
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("direction", torch.zeros(size, dim), persistent=False)  # recomputed every step
        self.optimizer = torch.optim.SGD([self.weight], lr=lr, momentum=momentum, weight_decay=weight_decay)

    @property
    def size(self) -> int:
        return self.weight.shape[0]

    def vectors(self) -> Tensor:
        """The unit-normalised bank [K, D] (no gradient to the bank from the encoder's loss)."""
        return F.normalize(self.weight.detach(), dim=1)

    @torch.no_grad()
    def record(self, direction: Tensor) -> None:
        """Set this step's ascent direction [K, D] (what ``step`` moves the vectors along). In a data-parallel step
        the ranks' directions (each from its own queries' mean loss) are averaged: the global batch's direction."""
        self.direction.copy_(all_reduce_with_grad(direction) / world_size() if collective() else direction)

    @torch.no_grad()
    def fill(self, keys: Tensor) -> None:
        """Write ``keys`` [B, D] into the next rows not yet filled (no-op once all K are); their recorded direction
        is dropped. No host sync: the rows are chosen with tensors, past-the-end writes keep the old row."""
        keys = gather_with_grad(keys.detach())[: self.size].to(self.weight.dtype)  # all ranks' keys, as push
        pos = self.filled + torch.arange(keys.shape[0], device=keys.device)
        idx, fresh = pos % self.size, (pos < self.size)[:, None]
        self.weight.index_copy_(0, idx, torch.where(fresh, keys, self.weight[idx]))
        self.direction.index_copy_(0, idx, torch.where(fresh, 0.0, self.direction[idx]))
        self.filled.copy_(torch.clamp(self.filled + keys.shape[0], max=self.size))

    def set_lr(self, lr: float) -> None:
        """The bank's learning rate from now on (a method's own bank schedule, e.g. CaCo's warm-up)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self) -> None:
        """One SGD step of the bank along the recorded direction (the optimizer minimises, so its gradient is −d)."""
        self._track_weight()
        self.weight.grad = -self.direction
        self.optimizer.step()
        self.weight.grad = None

    def _track_weight(self) -> None:
        """Point the optimizer at the current ``weight`` object (a module conversion may have replaced it)."""
        group = self.optimizer.param_groups[0]
        old = group["params"][0]
        if old is not self.weight:
            group["params"][0] = self.weight
            if old in self.optimizer.state:
                self.optimizer.state[self.weight] = self.optimizer.state.pop(old)

    def run_state(self, prefix: str) -> dict[str, Tensor]:
        """The bank optimizer's tensors (SGD's momentum buffer), for the method's ``run_state``."""
        self._track_weight()
        return optimizer_tensors(self.optimizer, prefix + ".")

    def load_run_state(self, state: dict[str, Tensor], prefix: str) -> None:
        """Restore what ``run_state(prefix)`` returned (nothing saved: a fresh optimizer, as before its first step);
        also the layout of earlier releases, ``{prefix}.momentum_buffer``."""
        self._track_weight()
        self.optimizer.state.clear()
        load_optimizer_tensors(self.optimizer, state, prefix + ".")  # copies, on the bank's device


class BankMethod(Method):
    """Base of MoCo-style methods with a learnable bank (AdCo, CaCo): a key encoder (EMA of the encoder, factor
    ``key_momentum()``, by default ``options.momentum``) and a ``LearnableBank`` sized by ``options.bank_size``/
    ``bank_lr``/``bank_momentum``/``bank_weight_decay``; both step after each optimizer step, and the bank's optimizer
    state is run state. ``forward_views`` runs a network on interleaved views one view at a time (BatchNorm statistics
    per view, as the AdCo and CaCo code) or, with ``options.joint_forward``, as one 2N batch."""

    def __init__(self, options: Any, encoder: nn.Module, attack: Any, augment: Any) -> None:
        super().__init__(options, encoder, attack, augment)
        self.key_encoder = momentum_copy(encoder)
        self.bank = LearnableBank(options.bank_size, encoder.out_dim, options.bank_lr, options.bank_momentum,
                                  options.bank_weight_decay)

    def forward_views(self, net: nn.Module, views: Tensor) -> Tensor:
        """``net`` on interleaved views [2N, …] (rows 2i, 2i + 1: the two views of image i), outputs interleaved the
        same way: one forward per view, or one forward of all 2N rows with ``options.joint_forward``."""
        if getattr(self.options, "joint_forward", False):
            return net(views)
        return pair_rows(net(views[0::2]), net(views[1::2]))

    def key_momentum(self) -> float | Tensor:
        """m of the next key-encoder update (a method with a momentum schedule overrides this)."""
        return self.options.momentum

    def after_optimizer_step(self) -> None:
        ema_update(self.key_encoder, self.encoder, self.key_momentum())
        self.bank.step()

    def run_state(self) -> dict[str, Tensor]:
        return self.bank.run_state("bank")

    def load_run_state(self, state: dict[str, Tensor]) -> None:
        self.bank.load_run_state(state, "bank")
