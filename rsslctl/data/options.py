"""The recipe's ``[augment]`` options, torch-free (recipe validation reads them without kornia)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from rsslctl.base.options import Number, opt

#: the weakest augmentation strength a schedule may reach (strength 0 would make the views identical)
MIN_STRENGTH = 0.01


@dataclasses.dataclass
class AugmentOptions:
    """The recipe's ``[augment]`` section."""

    strength: Number = opt(1.0, "augmentation strength s; scales crop area, jitter and grayscale",
                           min=MIN_STRENGTH, max=1.0)
    crop_scale: tuple[float, float] | None = opt(None, "RandomResizedCrop area range; default (1 - 0.9 s, 1)")
    crop_ratio: tuple[float, float] = opt((3 / 4, 4 / 3), "RandomResizedCrop aspect-ratio range")
    flip_p: float = opt(0.5, "horizontal flip probability (not scaled by s)", min=0.0, max=1.0)
    jitter: tuple[float, float, float, float] = opt(
        (0.4, 0.4, 0.4, 0.1), "colour jitter brightness, contrast, saturation, hue at s = 1 (scaled by s)")
    jitter_p: float = opt(0.8, "colour jitter probability at s = 1 (scaled by s)", min=0.0, max=1.0)
    grayscale_p: float = opt(0.2, "grayscale probability at s = 1 (scaled by s)", min=0.0, max=1.0)
    interpolation: Literal["bicubic", "bilinear"] = opt(
        "bicubic", "crop resize interpolation (ACL/AIR/RCS: bicubic, official DynACL: bilinear)",
        choices=("bicubic", "bilinear"))
