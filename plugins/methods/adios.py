"""ADIOS (Shi, Siddharth, Torr & Kosiorek, "Adversarial Masking for Self-Supervised Learning", ICML 2022), in the SimCLR
or the BYOL form.

An occluder — a small U-Net ending in a 1×1 convolution and a softmax over N channels — splits every pixel of a view
among N masks (m_1 … m_N ≥ 0, Σ_k m_k = 1 per pixel). The encoder minimises, and the occluder maximises,

    L = Σ_k NT-Xent( z(v1), z(v2 ⊙ (1 − m_k)) )

(each term one SimCLR loss between a view and the other view with mask k blacked out). ``form = "byol"`` replaces each
term by the symmetric BYOL loss b(q(z(v1)), z̄(v2 ⊙ (1 − m_k))) + b(q(z(v2 ⊙ (1 − m_k))), z̄(v1)) with b(p, t) = 2 −
2·cos(p, t) averaged over the batch, q a predictor MLP and z̄ an EMA copy of the encoder (weights ← τ·weights + (1 −
τ)·online after every step; the authors raise τ towards 1 over training, ours stays at ``momentum``). The occluder also
pays the paper's sparsity penalty, which keeps every mask away from covering nothing or everything:

    P = Σ_k mean_b 1 / (sin(π · s_{k,b}) + 1e−10),   s_{k,b} = mean over pixels of m_k for image b,

so the occluder minimises −L + α·P with its own optimizer (SGD, ``mask_lr``), outside the engine's optimizer
(``Method.optimizer_parameters``); that optimizer's state is part of the run state, so resume is exact.

``update = "alternating"`` (default, as the authors' code): the encoder steps on L with the masks held fixed, then
the occluder steps against the updated encoder on the same views (a second forward pass). ``"simultaneous"``: one
forward pass; the masks enter L through a gradient reversal, so the engine's backward gives the encoder ∂L and the
occluder −∂L + α∂P, and the occluder steps right after the encoder (cheaper, not the reference schedule).

Each view goes through the encoder in a forward of its own (train-mode BatchNorm statistics per view), as the
authors' code (github.com/YugeTen/adios, src/methods/simclr_adios.py and byol_adios.py, commit 21c6f23); the switch
``joint_forward = true`` restores the earlier interleaved 2N-image forward in the SimCLR form (one batch per
mask, BN statistics over both views: a different loss in train mode, fewer kernel launches).

Differences from the authors' code: the occluder is a plain U-Net without their fully connected bottleneck, and its
learning rate is constant (theirs follows the encoder's cosine schedule); the BYOL form's target momentum is constant
(theirs rises to 1) and its target forwards the unmasked view once per step (theirs once per mask: the same values,
only its BN running statistics move more often); no online linear classifier is trained.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsslctl import Encoder, Method, hookimpl, load_optimizer_tensors, multi_view, nt_xent, optimizer_tensors, pair_rows
from rsslctl_plugins.methods.options import CITATION, ADIOSOptions


def sparsity_penalty(masks: Tensor) -> Tensor:
    """P = Σ_k mean_b 1 / (sin(π s_{k,b}) + 1e−10) with s_{k,b} the mean of mask k over the pixels of image b;
    ``masks`` [B, N, H, W]. Large when a mask covers almost nothing or almost everything."""
    s = masks.float().mean(dim=(2, 3))
    return (1.0 / (torch.sin(math.pi * s) + 1e-10)).mean(0).sum()


def byol_loss(p: Tensor, t: Tensor) -> Tensor:
    """b(p, t) = mean_b (2 − 2·cos(p_b, t_b)); the target ``t`` gets no gradient."""
    return (2 - 2 * F.cosine_similarity(p.float(), t.detach().float(), dim=-1)).mean()


def _block(cin: int, cout: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none")]
    if norm == "group":
        layers.append(nn.GroupNorm(min(8, cout), cout))
    elif norm == "instance":
        layers.append(nn.InstanceNorm2d(cout, affine=True))
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


class Occluder(nn.Module):
    """U-Net (conv blocks, ×2 down/up-sampling, skip connections) → 1×1 conv → softmax over ``num_masks`` channels."""

    def __init__(self, channels: int, num_masks: int, width: int, levels: int, norm: str) -> None:
        super().__init__()
        widths = [width * min(2 ** i, 4) for i in range(levels)]
        self.down = nn.ModuleList(_block(cin, cout, norm) for cin, cout in zip([channels, *widths], widths))
        self.up = nn.ModuleList(_block(widths[i] + widths[i + 1], widths[i], norm) for i in reversed(range(levels - 1)))
        self.head = nn.Conv2d(widths[0], num_masks, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool2d(x, 2, ceil_mode=True))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], 1))
        return torch.softmax(self.head(x).float(), dim=1)


class ADIOS(Method):
    """ADIOS: an occluder network learns N masks adversarially against the SSL loss (SimCLR or BYOL form)."""

    name = "adios"
    citation = CITATION["adios"]
    Options = ADIOSOptions

    def __init__(self, options: ADIOSOptions, encoder: Encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        levels = options.mask_levels or max(2, int(math.log2(augment.size)) - 1)
        channels = encoder.mean.shape[1]
        self.occluder = Occluder(channels, options.num_masks, options.mask_width, levels, options.mask_norm)
        self.mask_optimizer = torch.optim.SGD(self.occluder.parameters(), lr=options.mask_lr,
                                              momentum=options.mask_momentum)
        if options.form == "byol":
            dim = encoder.out_dim
            self.predictor = nn.Sequential(nn.Linear(dim, options.predictor_hidden),
                                           nn.BatchNorm1d(options.predictor_hidden), nn.ReLU(inplace=True),
                                           nn.Linear(options.predictor_hidden, dim))
            self.target = copy.deepcopy(encoder).requires_grad_(False)
        self._pending: tuple[Tensor, Tensor] | None = None
        self._amp: tuple[str, torch.dtype] | None = None

    def optimizer_parameters(self) -> list[nn.Parameter]:
        occluder = {id(p) for p in self.occluder.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in occluder]

    def ssl_loss(self, v1: Tensor, v2: Tensor, masks: Tensor) -> Tensor:
        """L = Σ_k NT-Xent(z(v1), z(v2 ⊙ (1 − m_k))), each view through the encoder on its own (``joint_forward``: one
        interleaved batch per mask); BYOL form: the symmetric BYOL loss per mask, each view through the online and the
        target network on its own."""
        total = v1.new_zeros((), dtype=torch.float32)
        if self.options.form == "byol":
            with torch.no_grad():
                t1 = self.target(v1)
        for k in range(masks.shape[1]):
            masked = v2 * (1 - masks[:, k:k + 1].to(v2.dtype))
            if self.options.form == "byol":
                with torch.no_grad():
                    t2 = self.target(masked)
                p1, p2 = self.predictor(self.encoder(v1)), self.predictor(self.encoder(masked))
                total = total + byol_loss(p1, t2) + byol_loss(p2, t1)
                continue
            if self.options.joint_forward:  # rows 2i, 2i+1: the two views of image i, in one batch
                z = self.encoder(pair_rows(v1, masked))
            else:  # the authors' forwards: BN statistics of each view on its own
                z = pair_rows(self.encoder(v1), self.encoder(masked))
            total = total + nt_xent(z, self.options.temperature)
        return total

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        views = multi_view(images, self.augment, 2).unflatten(0, (-1, 2))
        v1, v2 = views[:, 0], views[:, 1]
        device = v1.device.type
        amp = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        self._amp = (device, torch.get_autocast_dtype(device)) if amp else None  # reused by the occluder's step
        if self.options.update == "alternating":
            with torch.no_grad():
                masks = self.occluder(v2)
            self._pending = (v1.detach(), v2.detach())
            loss = self.ssl_loss(v1, v2, masks)
            penalty = sparsity_penalty(masks)
        else:
            masks = self.occluder(v2)
            # value m, gradient −∂L/∂m: the encoder descends L, the occluder ascends it, in one backward pass
            reversed_masks = 2 * masks.detach() - masks
            loss = self.ssl_loss(v1, v2, reversed_masks)
            penalty = sparsity_penalty(masks)
            weighted = self.options.sparsity_weight * penalty
            loss = loss + (weighted - weighted.detach())  # the occluder's penalty gradient, the loss value unchanged
        coverage = masks.detach().float().mean(dim=(2, 3))  # [B, N]
        return loss, {"loss_ssl": loss.detach(), "mask_penalty": penalty.detach(),
                      "mask_coverage_min": coverage.min(1).values.mean(),
                      "mask_coverage_max": coverage.max(1).values.mean()}

    def occluder_step(self) -> None:
        """Alternating mode: one gradient-ascent step of the occluder on L − α·P against the current encoder."""
        if self._pending is None:
            return
        v1, v2 = self._pending
        self._pending = None
        amp = torch.autocast(self._amp[0], self._amp[1]) if self._amp else contextlib.nullcontext()
        params = list(self.occluder.parameters())
        with amp:
            masks = self.occluder(v2)
            objective = self.ssl_loss(v1, v2, masks) - self.options.sparsity_weight * sparsity_penalty(masks)
        grads = torch.autograd.grad(-objective, params)  # occluder gradients only; the encoder's stay untouched
        for p, g in zip(params, grads):
            p.grad = g
        self.mask_optimizer.step()
        self.mask_optimizer.zero_grad(set_to_none=True)

    def after_optimizer_step(self) -> None:
        if self.options.update == "alternating":
            self.occluder_step()
        else:  # the engine's backward left −∂L + α∂P in the occluder's gradients
            self.mask_optimizer.step()
            self.mask_optimizer.zero_grad(set_to_none=True)
        if self.options.form == "byol":  # after both steps, as the authors' code
            with torch.no_grad():
                target, online = list(self.target.parameters()), list(self.encoder.parameters())
                torch._foreach_lerp_(target, online, 1 - self.options.momentum)

    def run_state(self) -> dict[str, Tensor]:
        return optimizer_tensors(self.mask_optimizer, "mask_optimizer.")

    def load_run_state(self, state: dict[str, Tensor]) -> None:
        load_optimizer_tensors(self.mask_optimizer, state, "mask_optimizer.")


@hookimpl
def rsslctl_methods() -> list[type]:
    return [ADIOS]
