"""Batched view augmentation for contrastive/adversarial SSL (the SimCLR/ACL pipeline).

The pipeline, parameterised by a strength ``s`` in (0, 1]:

1. RandomResizedCrop, area scale ``(1 - 0.9 s, 1)``, ratio ``(3/4, 4/3)``, bicubic (ACL/AIR/RCS) or bilinear (DynACL);
2. RandomHorizontalFlip, p = 0.5 (never annealed);
3. ColorJitter(0.4 s, 0.4 s, 0.4 s, 0.1 s) with probability 0.8 s (torchvision semantics);
4. RandomGrayscale, p = 0.2 s;
5. float32 output in [0, 1], no normalisation.

At ``s = 1`` this is the SimCLR CIFAR pipeline with crop scale (0.1, 1). Every random parameter is drawn per
sample, on the CPU, from torch's global RNG (so ``torch.manual_seed`` and ``torch.get_rng_state`` reproduce it);
the images stay on their device and are processed in one batched call. Nothing is ever read back from the device:
whether a sample is jittered, flipped or greyed is a ``torch.where`` on a mask copied to the device, not a Python
branch, so a CUDA step never waits here (tests/train/test_sync.py checks it for every method).

Known difference from torchvision: one random order of the four colour-jitter steps is drawn per batch (on the
CPU, with the other parameters), not per image; the jitter factors themselves are per image. A per-image order
would need all four steps evaluated at each of the four positions (4× the jitter work, hue included).
"""
from __future__ import annotations

from typing import Any, Callable

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor

from rsslctl.data.options import MIN_STRENGTH, AugmentOptions  # noqa: F401 (re-exported)


class _ResizedCrop(K.RandomResizedCrop):
    """kornia's RandomResizedCrop (same torchvision-style parameter draw), resized like torchvision.

    kornia's "slice" mode crops each image in a Python loop that reads the boxes back to the host, and its
    "resample" mode maps corner pixel centres; this warps the whole batch with one ``grid_sample`` on the
    half-pixel grid, which equals torchvision's crop + ``interpolate(align_corners=False)``, then clamps the
    bicubic overshoot to [0, 1].
    """

    def apply_transform(self, input: Tensor, params: dict[str, Tensor], flags: dict[str, Any],
                        transform: Tensor | None = None) -> Tensor:
        box = params["src"]  # (B, 4, 2) inclusive integer corners (x, y): top-left, ..., bottom-left
        x0, y0 = box[:, 0, 0], box[:, 0, 1]
        w, h = box[:, 2, 0] - x0 + 1, box[:, 2, 1] - y0 + 1
        in_h, in_w = input.shape[-2:]
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([w / in_w, zero, (2 * x0 + w) / in_w - 1], -1),
                             torch.stack([zero, h / in_h, (2 * y0 + h) / in_h - 1], -1)], 1)
        theta = theta.to(input.device, input.dtype, non_blocking=True)
        grid = F.affine_grid(theta, [input.shape[0], input.shape[1], *flags["size"]], align_corners=False)
        out = F.grid_sample(input, grid, mode=flags["resample"].name.lower(), padding_mode="border",
                            align_corners=False)
        return out.clamp_(0.0, 1.0)


class _ColourJitter(K.ColorJitter):
    """kornia's ColorJitter (torchvision's brightness/contrast/saturation/hue formulas, per-sample factors, one random
    order per batch) without its data-dependent host checks.

    kornia skips a step when every factor of the batch is neutral, which reads a device tensor back (``.any()``) once
    per step; here a step runs unless its configured range is the neutral point alone (decided from the options, so
    never from data). With continuous random factors the skip never fired in practice, so the output is unchanged.
    The order tensor is drawn on the CPU, so iterating it reads nothing back from the device.
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float) -> None:
        super().__init__(brightness, contrast, saturation, hue, p=p)
        self.active = tuple(v > 0 for v in (brightness, contrast, saturation, hue))

    def apply_transform(self, input: Tensor, params: dict[str, Tensor], flags: dict[str, Any],
                        transform: Tensor | None = None) -> Tensor:
        steps = (self._brightness_fn, self._contrast_fn, self._saturation_fn, self._adjust_hue_turns)
        keys = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
        out = input.clamp(0.0, 1.0)
        for i in params["order"].tolist():  # a CPU tensor
            if self.active[i]:
                out = steps[i](out, params[keys[i]])
        return out.clamp(0.0, 1.0)


class HostRandom(torch.nn.Sequential):
    """kornia augmentations whose random parameters are drawn on the CPU whatever device the module tree is moved to.

    ``Module.to(device)`` would move kornia's parameter generators onto the GPU; the parameters would then come from
    the CUDA RNG and every host-side use of them (iterating the jitter order, kornia's blur-sigma check) would read
    the device back. The pipeline holds no tensors, so nothing else needs moving: the images stay on their device and
    the drawn parameters follow them with non-blocking copies.
    """

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> HostRandom:
        return self

    @torch.compiler.disable  # host-side parameter draws and Python loops over them: always eager
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


class ViewAugment(torch.nn.Module):
    """Random views of a batch: uint8 (0..255) or float ([0, 1]) ``[N, C, H, W]`` -> float32 ``[N, C, size, size]``."""

    def __init__(self, size: int, options: AugmentOptions,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        super().__init__()
        self.size = size
        self.options = options
        self.memory_format = memory_format
        self.set_strength(options.strength)

    def set_strength(self, s: float) -> None:
        """Re-parameterise the pipeline for strength ``s`` in (0, 1] (a method may anneal it during training)."""
        if not 0.0 < s <= 1.0:
            raise ValueError(f"augmentation strength must be in (0, 1], got {s}")
        o = self.options
        self.strength = float(s)
        scale = o.crop_scale if o.crop_scale is not None else (1.0 - 0.9 * s, 1.0)
        b, c, sat, hue = (v * s for v in o.jitter)
        self.geometric = HostRandom(
            _ResizedCrop((self.size, self.size), scale=scale, ratio=o.crop_ratio, resample=o.interpolation.upper(),
                         align_corners=False),
            K.RandomHorizontalFlip(p=o.flip_p),
        )
        # ColorJitter (not ColorJiggle) follows torchvision's brightness/contrast/saturation/hue formulas.
        self.colour = HostRandom(
            _ColourJitter(b, c, sat, hue, p=o.jitter_p * s),
            K.RandomGrayscale(p=o.grayscale_p * s),
        )

    @torch.compiler.disable  # random parameters are drawn on the host, per call: augmentation always runs eagerly
    def forward(self, x: Tensor) -> Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        out = self.geometric(x)
        if out.shape[1] == 3:  # colour ops need RGB; a grayscale batch gets crop + flip only
            out = self.colour(out)
        return out.clamp_(0.0, 1.0).contiguous(memory_format=self.memory_format)


def multi_view(x: Tensor, augment: Callable[[Tensor], Tensor], n_views: int) -> Tensor:
    """``n_views`` augmented views per image, interleaved: rows ``k*n .. k*n+n-1`` are the views of image ``k``."""
    return augment(x.repeat_interleave(n_views, dim=0))
