"""Any image collection in torchvision ImageFolder layout: <root>/<path>/<split>/<class>/<images>."""
from __future__ import annotations

from pathlib import Path

import torch

from rsslctl import (
    Dataset,
    FileSource,
    ImageData,
    ImageSource,
    UserError,
    check_allocation,
    decode_file,
    hookimpl,
    missing_data,
)
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
            images[n] = decode_file(f, size)  # the streamed path's FileSource decodes the same way
        labels = torch.tensor([i for _, i in files], dtype=torch.int64)
        return ImageData(images, labels, classes, self.name)

    def source(self, split: str) -> ImageSource:
        """The split's file list, decoded one image at a time by the streamed path's workers."""
        files, classes = self._files(split)
        return FileSource([f for f, _ in files], torch.tensor([i for _, i in files], dtype=torch.int64), classes,
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
                               "put one sub-folder per class holding png/jpg/jpeg/bmp/webp images there "
                               "(or set the dataset's path option)")
        return files, classes

    def _inside(self, path: Path) -> bool:
        """True unless ``path`` resolves (through symlinks) outside the dataset folder and following is off."""
        if self.options.follow_symlinks:
            return True
        root = (self.root / self.options.path).resolve()
        real = path.resolve()
        return real == root or root in real.parents


@hookimpl
def rsslctl_datasets() -> list[type]:
    return [ImageFolder]
