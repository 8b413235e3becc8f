"""Image files → RGB uint8 tensors [3, S, S], the same pixels on the resident and the streamed path.

Decoding is torchvision.io's (libjpeg-turbo, libpng, libwebp; nvJPEG for batches of JPEGs on CUDA), resizing is
torchvision's antialiased bicubic resize on tensors: faster than PIL decode + PIL resize (benchmarks/bench_decode.py)
with the same pixels within rounding. PIL only parses the header first (cheap: it does not decode) for two things
torchvision.io lacks: its decompression-bomb guard and the formats torchvision.io cannot read (BMP), which PIL then
decodes.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rsslctl.base.errors import UserError

#: formats torchvision.io decodes (PIL's names for them); anything else PIL decodes
_TORCHVISION_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "GIF"}
#: torchvision.io's messages start with the C++ function and source location: keep only the reason
_CPP_PREFIX = re.compile(r"^.*?\.cpp:\d+, ")


def read_bytes(path: Path) -> Tensor:
    """The file's bytes as a uint8 tensor; one line when it is gone."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise UserError(f"{path}: image file missing (removed after the dataset was listed); restore it or "
                        "remove it from the split") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read image file ({exc.strerror or exc}); fix its permissions or remove "
                        "it") from None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def image_format(path: Path, data: Tensor) -> str:
    """PIL's name of the file's format (JPEG, PNG, ...) from its header alone; one line when it is not an image or
    declares so many pixels that it may be a decompression bomb."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return str(im.format)
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: refused as a possible decompression bomb ({exc})") from None
    except (OSError, UnidentifiedImageError, ValueError, MemoryError) as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: BaseException) -> UserError:
    reason = _CPP_PREFIX.sub("", " ".join(str(exc).split())) or type(exc).__name__
    return UserError(f"{path}: cannot read image ({reason}); fix or remove the file")


def fit(image: Tensor, size: int) -> Tensor:
    """RGB image [3, H, W] (uint8, or uint16 from 16-bit PNGs) → uint8 [3, size, size], antialiased bicubic."""
    from torchvision.transforms.v2 import functional as TF

    if image.dtype != torch.uint8:
        image = TF.to_dtype(image, torch.uint8, scale=True)
    if image.shape[-2:] != (size, size):
        image = TF.resize(image, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return image.contiguous()


def decode_file(path: Path, size: int) -> Tensor:
    """One image file as RGB uint8 [3, size, size]; one line naming the file when it cannot be read."""
    data = read_bytes(path)
    return fit(decode_bytes(path, data), size)


def decode_bytes(path: Path, data: Tensor) -> Tensor:
    """The encoded bytes ``data`` of ``path`` decoded to RGB [3, H, W] on the CPU (grey, palette, alpha and CMYK
    converted as PIL's ``convert("RGB")`` does: alpha dropped, grey replicated)."""
    from torchvision.io import ImageReadMode, decode_image

    kind = image_format(path, data)
    try:
        if kind in _TORCHVISION_FORMATS:
            image = decode_image(data, mode=ImageReadMode.RGB)
            return image[0] if image.ndim == 4 else image  # animated GIF: its first frame
        from PIL import Image

        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    except (RuntimeError, OSError, ValueError, MemoryError) as exc:
        raise _unreadable(path, exc) from None


def is_jpeg(data: Tensor) -> bool:
    """True when ``data`` starts with a JPEG's start-of-image marker (what nvJPEG can take)."""
    return data.numel() > 3 and data[:3].tolist() == [0xFF, 0xD8, 0xFF]


def decode_on_device(paths: list[Path], encoded: list[Tensor], size: int, device: torch.device) -> Tensor:
    """JPEG files decoded together on ``device`` (nvJPEG's batched decode on CUDA) and resized there: uint8
    [len(paths), 3, size, size]. A file nvJPEG rejects (e.g. CMYK, progressive variants it lacks) is decoded on the
    CPU instead; one that no decoder reads is one line naming it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the whole batch: decode one by one to find it
        images = []
        for path, data in zip(paths, encoded):
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(decode_bytes(path, data).to(device))
    return torch.stack([fit(image, size) for image in images])


def as_path(raw: bytes) -> Path:
    """A path stored as file-system bytes (see ``FileSource``)."""
    return Path(os.fsdecode(raw))
