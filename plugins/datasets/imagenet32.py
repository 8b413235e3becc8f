"""Downsampled ImageNet 32x32 (Chrabaszcz et al., 2017), npz or pickled release."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsslctl import Dataset, ImageData, ImageSource, UserError, hookimpl, missing_data, npz_memmap, safe_unpickle
from rsslctl_plugins.datasets.options import CITATION


def _check_images(path: Path, dtype: Any, shape: tuple) -> None:
    """The release stores uint8 pixels, 3072 per image: anything else would be cast silently into other pixels."""
    if np.dtype(dtype) != np.uint8:
        raise UserError(f"{path}: images stored as {np.dtype(dtype)}, ImageNet-32 stores uint8 pixels; re-extract "
                        "the archive, or convert the images to uint8 (0-255) yourself")
    if len(shape) != 2 or shape[1] != 3072:
        raise UserError(f"{path}: images of shape {tuple(shape)}, expected [N, 3072] (32x32x3); re-extract the "
                        "archive")


def _check_labels(path: Path, labels: Any) -> np.ndarray:
    """Labels as int64 0..999; the files hold integers 1..1000."""
    y = np.asarray(labels).reshape(-1)
    if not (np.issubdtype(y.dtype, np.integer) and y.dtype != np.bool_):
        raise UserError(f"{path}: labels stored as {y.dtype}, expected integers 1-1000; re-extract the archive")
    if len(y) and (int(y.min()) < 1 or int(y.max()) > 1000):
        bad = int(y.min()) if int(y.min()) < 1 else int(y.max())
        raise UserError(f"{path}: label {bad} is outside 1-1000; re-extract the archive")
    return y.astype(np.int64) - 1


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 [N, 3072], labels 0..999) of one batch file."""
    data, labels = _read_raw(path)
    data = np.asarray(data)
    _check_images(path, data.dtype, data.shape)
    return data, _check_labels(path, labels)


def _read_raw(path: Path) -> tuple[Any, Any]:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return npz["data"], npz["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            raise UserError(f"{path}: not a valid ImageNet-32 batch ({exc}); re-extract the archive") from None
    batch: Any = safe_unpickle(path)
    try:
        get = lambda k: batch[k] if k in batch else batch[k.encode()]  # noqa: E731  (str or bytes keys)
        return get("data"), get("labels")
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a valid ImageNet-32 batch (missing {exc}); re-extract the archive") from None


def _read_labels(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: not a valid ImageNet-32 batch ({exc}); re-extract the archive") from None


class _NpzSource(ImageSource):
    """Images memory-mapped from uncompressed npz batch files; the maps open lazily in each worker."""

    def __init__(self, paths: list[Path], layout: list[tuple], labels: torch.Tensor, classes: list[str],
                 name: str) -> None:
        super().__init__(labels, classes, name)
        self.paths, self.layout = [str(p) for p in paths], layout
        self.ends = np.cumsum([shape[0] for _, shape, _ in layout])
        self._maps: list[np.memmap] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def read(self, i: int) -> torch.Tensor:
        if self._maps is None:
            try:
                self._maps = [np.memmap(p, dtype=d, mode="r", offset=o, shape=s)
                              for p, (d, s, o) in zip(self.paths, self.layout)]
            except (OSError, ValueError) as exc:
                raise UserError(f"{self.paths[0]}: cannot map ImageNet-32 batch files ({exc}); re-extract the "
                                "archive") from None
        f = int(np.searchsorted(self.ends, i, side="right"))
        row = i - (int(self.ends[f - 1]) if f else 0)
        return torch.from_numpy(np.array(self._maps[f][row]).reshape(3, 32, 32))


class Imagenet32(Dataset):
    """ImageNet at 32x32: 1,281,167 train / 50,000 val colour images in 1,000 classes."""

    name = "imagenet32"
    citation = CITATION["imagenet32"]
    splits = ("train", "val")

    def _paths(self, split: str) -> list[Path]:
        """The split's batch files (npz release preferred); one line when some are missing."""
        split = "val" if split == "test" else split  # the official val set serves as the test set
        if split not in self.splits:
            raise UserError(f"{self.name}: unknown split '{split}'; valid splits: train, val (or test)")
        stems = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
        npz = [self.root / f"Imagenet32_{split}_npz" / f"{s}.npz" for s in stems]
        pkl = [self.root / f"Imagenet32_{split}" / s for s in stems]
        paths = npz if all(p.is_file() for p in npz) else pkl
        if not all(p.is_file() for p in paths):
            raise missing_data(self.name, [p for p in npz + pkl if not p.is_file()],
                               f"download 'Imagenet32_{split}_npz.zip' from image-net.org (downsampled images) "
                               f"and extract it under {self.root}")
        return paths

    def source(self, split: str) -> ImageSource | None:
        """The npz release, memory-mapped (its arrays are stored uncompressed): the streamed path's workers read
        each image from the page cache. None for the pickled release (streamed from host memory instead)."""
        paths = self._paths(split)
        if paths[0].suffix != ".npz":
            return None
        try:
            layout = [npz_memmap(p, "data") for p in paths]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise UserError(f"{paths[0].parent}: not a valid ImageNet-32 batch ({exc}); "
                            "re-extract the archive") from None
        if any(m is None for m in layout):
            return None  # compressed arrays: load whole
        for p, (dtype, shape, _) in zip(paths, layout):
            _check_images(p, dtype, shape)
        labels = [_check_labels(p, _read_labels(p)) for p in paths]
        if any(len(y) != m[1][0] for y, m in zip(labels, layout)):
            raise UserError(f"{paths[0].parent}: corrupted ImageNet-32 files (image and label counts differ); "
                            "re-extract the archive")
        return _NpzSource(paths, layout, torch.from_numpy(np.concatenate(labels)), self._classes(), self.name)

    def load(self, split: str) -> ImageData:
        paths = self._paths(split)
        parts = [_read(p) for p in paths]
        try:
            data = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
            labels = np.concatenate([y for _, y in parts])
            if len(data) != len(labels):
                raise ValueError(f"{len(data)} images but {len(labels)} labels")
        except ValueError as exc:
            raise UserError(f"{paths[0].parent}: corrupted ImageNet-32 files ({exc}); re-extract the archive") from None
        return ImageData(torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels), self._classes(),
                         self.name)

    def _classes(self) -> list[str]:
        """Class names: an optional synset map ("n01440764 1 tench" per line) gives readable ones."""
        classes = [str(i) for i in range(1000)]
        names = self.root / "map_clsloc.txt"
        for line in names.read_text().splitlines() if names.is_file() else []:
            words = line.split()
            if len(words) >= 3 and words[1].isdigit() and 1 <= int(words[1]) <= 1000:
                classes[int(words[1]) - 1] = words[2]
        return classes


@hookimpl
def rsslctl_datasets() -> list[type]:
    return [Imagenet32]
