"""Common corruptions (the robustness suite's CA): read CIFAR-10-C / CIFAR-100-C files, or generate a subset on the fly.

Real files: ``<dir>/<corruption>.npy`` holds all five severities stacked (NHWC uint8, severity ``s`` at rows
``(s-1)·n .. s·n``) and ``<dir>/labels.npy`` the matching labels. The 15 corruptions of the benchmark are
read (CIFAR-100-C's four extra ones are skipped, as in the reference).

Generated: when no files are present, the corruptions below are produced from the clean test set with our own
batched torch code, using the severity parameters of the CIFAR-10-C generation script (Hendrycks & Dietterich,
ICLR 2019). Only 8 of the 15 are covered (the weather, glass/motion/zoom blur and elastic ones need assets or
per-image CPU code), and the noise draws differ from the released files, so these numbers are labelled
"generated" and are NOT comparable with the leaderboard's corruption accuracy. Installable packages
(imagecorruptions and its forks) need OpenCV and scikit-image and use ImageNet-C parameters, so we do not use them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rsslctl.base.errors import UserError

CORRUPTIONS = ("shot_noise", "gaussian_noise", "impulse_noise", "contrast", "zoom_blur", "motion_blur", "glass_blur",
               "defocus_blur", "snow", "pixelate", "brightness", "fog", "jpeg_compression", "elastic_transform",
               "frost")
SEVERITIES = (1, 2, 3, 4, 5)


def corruption_dir(root: Path, folder: str) -> Path | None:
    """``root`` itself if it holds the files, else ``root/<folder>`` (the dataset plugin's ``corruption_folder``,
    e.g. CIFAR-10-C); None when absent."""
    root = Path(root)
    for cand in (root, root / folder):
        if (cand / "labels.npy").is_file():
            return cand
    return None


def read_corruptions(folder: Path, limit: int = 0) -> Iterator[tuple[str, int, Tensor, Tensor]]:
    """Yield (corruption, severity, images uint8 NCHW, labels) from a CIFAR-C folder (first ``limit`` per severity)."""
    folder = Path(folder)
    missing = [c for c in CORRUPTIONS if not (folder / f"{c}.npy").is_file()]
    if missing:
        raise UserError(f"{folder}: corruption files missing: {', '.join(m + '.npy' for m in missing)}; "
                        "extract the complete CIFAR-10-C/CIFAR-100-C archive there")
    labels = np.load(folder / "labels.npy", allow_pickle=False)
    if labels.ndim != 1 or len(labels) % len(SEVERITIES):
        raise UserError(f"{folder / 'labels.npy'}: expected one label per image for 5 stacked severities, "
                        f"got shape {labels.shape}")
    per = len(labels) // len(SEVERITIES)
    take = min(limit, per) if limit else per
    for name in CORRUPTIONS:
        data = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        if data.ndim != 4 or data.shape[0] != len(labels) or data.shape[-1] != 3 or data.dtype != np.uint8:
            raise UserError(f"{folder / (name + '.npy')}: expected uint8 [{len(labels)}, H, W, 3], "
                            f"got {data.dtype} {list(data.shape)}")
        for s in SEVERITIES:
            rows = slice((s - 1) * per, (s - 1) * per + take)
            images = torch.from_numpy(np.array(data[rows]))  # copy out of the read-only memory map
            images = images.permute(0, 3, 1, 2).contiguous()
            yield name, s, images, torch.from_numpy(labels[rows].astype(np.int64))


# -- generated subset (input/output: float images in [0, 1], NCHW) -------------------------------------------------
def _gaussian_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = (0.04, 0.06, 0.08, 0.09, 0.10)[s - 1]
    return x + c * torch.randn(x.shape, generator=g).to(x.device)


def _shot_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = (500, 250, 100, 75, 50)[s - 1]
    return torch.poisson((x * c).cpu(), generator=g).to(x.device) / c


def _impulse_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[s - 1]
    u = torch.rand(x.shape, generator=g).to(x.device)
    salt = torch.rand(x.shape, generator=g).to(x.device) < 0.5
    hit = u < amount  # salt-and-pepper on each value independently, half white, half black
    return torch.where(hit, salt.to(x.dtype), x)


def _contrast(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[s - 1]
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * c + mean


def _brightness(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    from kornia.color import hsv_to_rgb, rgb_to_hsv
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[s - 1]
    hsv = rgb_to_hsv(x)
    hsv = torch.cat([hsv[:, :2], (hsv[:, 2:] + c).clamp(0, 1)], 1)
    return hsv_to_rgb(hsv)


def _defocus_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))[s - 1]
    r = torch.arange(-8, 9, dtype=torch.float32)
    disk = ((r[:, None] ** 2 + r[None] ** 2) <= radius ** 2).float()
    disk /= disk.sum()
    k1 = torch.exp(-torch.arange(-1, 2, dtype=torch.float32) ** 2 / (2 * alias ** 2))  # 3×3 anti-alias blur
    smooth = (k1[:, None] * k1[None]) / k1.sum() ** 2
    kernel = F.conv2d(disk[None, None], smooth[None, None], padding=1)[0, 0]
    kernel = (kernel / kernel.sum()).to(x.device, x.dtype)
    c = x.shape[1]
    padded = F.pad(x, (8, 8, 8, 8), mode="reflect") if min(x.shape[-2:]) > 8 else F.pad(x, (8,) * 4, mode="replicate")
    return F.conv2d(padded, kernel.expand(c, 1, 17, 17), groups=c)


def _pixelate(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = (0.95, 0.9, 0.85, 0.75, 0.65)[s - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def _jpeg_compression(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    import io

    from PIL import Image
    quality = (80, 65, 58, 50, 40)[s - 1]
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in u8:  # PIL's encoder, as the CIFAR-C script used
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255


GENERATED: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "contrast": _contrast, "brightness": _brightness, "defocus_blur": _defocus_blur, "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}


def generate(x: Tensor, name: str, severity: int, generator: torch.Generator) -> Tensor:
    """Corrupt float images ``x`` in [0, 1] (NCHW, RGB) with ``name`` at ``severity``; result clipped to [0, 1]."""
    if x.shape[1] != 3:
        raise UserError(f"generated corruptions need RGB images, got {x.shape[1]} channels")
    return GENERATED[name](x.float(), severity, generator).clamp(0.0, 1.0)
