"""Image decoding (torchvision.io + tensor resize): every colour mode PIL's convert("RGB") handles, the same pixels
on the resident and the streamed path (and with the device decoder's batch path), one line per unreadable file."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsslctl.base.errors import UserError
from rsslctl.base.options import validate
from rsslctl.data.dataset import FileSource
from rsslctl.data.decode import decode_file, read_bytes
from rsslctl.data.stream import StreamSplit, _on_device
from rsslctl_plugins.datasets.image_folder import ImageFolder

RNG = np.random.default_rng(3)
CPU = torch.device("cpu")


def smooth(h: int, w: int) -> np.ndarray:
    """A smooth RGB picture (JPEG-friendly) with some noise, uint8 [h, w, 3]."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
    return np.clip(base + RNG.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def variants() -> dict[str, Image.Image]:
    rgb = Image.fromarray(smooth(21, 17))
    return {"rgb.jpg": rgb, "grey.jpg": rgb.convert("L"), "cmyk.jpg": rgb.convert("CMYK"),
            "rgb.png": rgb, "grey.png": rgb.convert("L"), "greyalpha.png": rgb.convert("LA"),
            "rgba.png": rgb.convert("RGBA"), "palette.png": rgb.convert("P"), "lossless.webp": rgb,
            "rgb.bmp": rgb}


def write_folder(root: Path) -> dict[str, Path]:
    files = {}
    for k, (name, im) in enumerate(variants().items()):
        folder = root / "imgs" / "train" / f"c{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        im.save(path, lossless=True) if name.endswith(".webp") else im.save(path)
        files[name] = path
    return files


def folder(root: Path, size: int) -> ImageFolder:
    return ImageFolder(validate(ImageFolder.Options, {"path": "imgs", "image_size": size}, "data"), root)


@pytest.mark.parametrize("name", list(variants()))
def test_every_colour_mode_decodes_as_pil_converts_it(name: str, tmp_path: Path) -> None:
    path = write_folder(tmp_path)[name]
    with Image.open(path) as im:
        bicubic = torch.from_numpy(np.array(im.convert("RGB").resize((12, 12), Image.Resampling.BICUBIC)))
    small = decode_file(path, 12)
    assert small.shape == (3, 12, 12) and small.is_contiguous()
    # the tensor resize is PIL's antialiased bicubic within rounding
    assert int((small.int() - bicubic.permute(2, 0, 1).int()).abs().max()) <= 2


def test_decode_is_pil_exact_at_the_native_size(tmp_path: Path) -> None:
    for name, im in variants().items():
        path = tmp_path / name
        square = im.crop((0, 0, 17, 17))
        square.save(path, lossless=True) if name.endswith(".webp") else square.save(path)
        with Image.open(path) as back:
            pil = torch.from_numpy(np.array(back.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(decode_file(path, 17), pil), name


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path: Path) -> None:
    values = (RNG.integers(0, 256, size=(9, 9)).astype(np.uint16) * 257)
    Image.fromarray(values).save(tmp_path / "deep.png")
    out = decode_file(tmp_path / "deep.png", 9)
    assert out.dtype == torch.uint8 and torch.equal(out[0], torch.from_numpy((values // 257).astype(np.uint8)))


def test_resident_and_streamed_paths_give_identical_pixels(tmp_path: Path) -> None:
    write_folder(tmp_path)
    ds = folder(tmp_path, 12)
    resident, source = ds.load("train"), ds.source("train")
    assert isinstance(source, FileSource) and len(source) == len(resident) == len(variants())
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(0))
    for workers in (0, 2):
        split = StreamSplit(source, 12, workers=workers)
        assert torch.equal(split.gather(order), resident.images[order])
        rows = order[:8].view(2, 4)
        for idx, (x, y) in zip(rows, split.batches(rows, CPU), strict=True):
            assert torch.equal(x, resident.images[idx]) and torch.equal(y, resident.labels[idx])
    # the device decoder's batch path (JPEG bytes decoded together, the rest by the workers), run on the CPU
    items = [source.fetch(i) for i in range(len(source))]
    assert sum(t.ndim == 1 for _, t in items) == 3  # the three JPEGs stay encoded
    assert torch.equal(_on_device(items, 12, 12, CPU), resident.images)
    assert torch.equal(_on_device(items, 12, 8, CPU), resident.resized(8).images)


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_an_unreadable_file_is_one_line_naming_it(content: bytes | str, tmp_path: Path) -> None:
    files = write_folder(tmp_path)
    bad = files["rgb.jpg"].parent / "bad.jpg"
    if content == "truncated":
        buf = io.BytesIO()
        Image.fromarray(smooth(32, 32)).save(buf, "JPEG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    bad.write_bytes(content)
    ds = folder(tmp_path, 12)
    source = ds.source("train")
    checks = [lambda: ds.load("train"), lambda: StreamSplit(source, 12, workers=2).gather(torch.arange(len(source)))]
    if content != b"not an image at all":  # JPEG bytes handed to the device decoder
        checks.append(lambda: _on_device([source.fetch(i) for i in range(len(source))], 12, 12, CPU))
    for run in checks:
        with pytest.raises(UserError) as err:
            run()
        msg = str(err.value)
        assert str(bad) in msg and "\n" not in msg and "cannot read image" in msg and ".cpp" not in msg


def test_a_vanished_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="gone.png: image file missing") as err:
        read_bytes(tmp_path / "gone.png")
    assert "\n" not in str(err.value)
