"""Any image collection in torchvision ImageFolder layout: <root>/<path>/<split>/<class>/<images>."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from rsslctl import hookimpl, check_allocation, Dataset, ImageData, ImageSource, missing_data, UserError
from rsslctl_plugins.datasets.options import ImageFolderOptions

_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class ImageFolder(Dataset):
    """Images in one sub-folder per class (ImageFolder layout), resized to a square size, as RGB."""

    name = "image_folder"
    Options = ImageFolderOptions
    splits = ("train", "val", "test")

    def load(self, split: str) -> ImageData:
        files, classes = self._files(split)
        size = self.options.image_size
        check_allocation(len(files) * size * size * 3, f"{self.name}: {len(files):,} images at image_size = {size}",
                         "lower the dataset's image_size, or stream it (data.stream = \"on\")")
        images = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
        for n, (f, _) in enumerate(files):
            images[n] = _decode(f, size)
        labels = torch.tensor([i for _, i in files], dtype=torch.int64)
        return ImageData(images, labels, classes, self.name)

    def source(self, split: str) -> ImageSource:
        """The split's file list, decoded one image at a time by the streamed path's workers."""
        files, classes = self._files(split)
        return _FileSource([f for f, _ in files], torch.tensor([i for _, i in files], dtype=torch.int64), classes,
                           self.name, self.options.image_size)

    def _files(self, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
        """((image file, class index) of every image of ``split``, class names); one line when there are none."""
        base = self.root / self.options.path
        folder = base / split
        present = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        if split not in self.splits and split not in present:
            raise UserError(f"{self.name}: unknown split '{split}'; valid splits: "
                            f"{', '.join(sorted(set(self.splits) | set(present)))}")
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and self._inside(p)) if folder.is_dir() else []
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).rglob("*"))
                 if f.is_file() and f.suffix.lower() in _EXTENSIONS and self._inside(f)]
        if not files:
            raise missing_data(self.name, [folder],
                               f"put one sub-folder per class holding png/jpg/jpeg/bmp/webp images there "
                               "(or set the dataset's path option)")
        return files, classes

    def _inside(self, path: Path) -> bool:
        """True unless ``path`` resolves (through symlinks) outside the dataset folder and following is off."""
        if self.options.follow_symlinks:
            return True
        root = (self.root / self.options.path).resolve()
        real = path.resolve()
        return real == root or root in real.parents


def _decode(f: Path, size: int) -> torch.Tensor:
    """One image file as RGB uint8 [3, size, size] (bicubic resize); the same pixels on both data paths."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            pixels = np.array(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
    except FileNotFoundError:
        raise UserError(f"{f}: image file missing (removed after the dataset was listed); restore it or "
                        "remove it from the split") from None
    except Image.DecompressionBombError as exc:
        raise UserError(f"{f}: refused as a possible decompression bomb ({exc})") from None
    except (OSError, UnidentifiedImageError, ValueError, MemoryError) as exc:
        raise UserError(f"{f}: cannot read image ({exc}); fix or remove the file") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


class _FileSource(ImageSource):
    """Image files decoded on demand. The paths are one numpy bytes array, not a list of Python strings: forked
    workers then share its pages instead of copying them as they touch each string's reference count (a known
    DataLoader memory growth with million-file lists), and it pickles compactly when workers are spawned."""

    def __init__(self, files: list[Path], labels: torch.Tensor, classes: list[str], name: str, size: int) -> None:
        super().__init__(labels, classes, name)
        self.files, self.size = np.array([os.fsencode(f) for f in files], dtype=bytes), size

    def read(self, i: int) -> torch.Tensor:
        return _decode(Path(os.fsdecode(self.files[i])), self.size)


@hookimpl
def rsslctl_datasets() -> list[type]:
    return [ImageFolder]
