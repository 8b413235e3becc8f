"""SVHN (cropped digits, format 2) from the official .mat files."""
from __future__ import annotations

import numpy as np
import torch

from rsslctl import Dataset, ImageData, UserError, hookimpl, missing_data
from rsslctl_plugins.datasets.options import CITATION


class Svhn(Dataset):
    """SVHN: 32x32 colour house-number digits, 73,257 train / 26,032 test / 531,131 extra, 10 classes."""

    name = "svhn"
    citation = CITATION["svhn"]
    splits = ("train", "test", "extra")

    def load(self, split: str) -> ImageData:
        if split not in self.splits:
            raise UserError(f"{self.name}: unknown split '{split}'; valid splits: {', '.join(self.splits)}")
        path = self.root / f"{split}_32x32.mat"
        if not path.is_file():
            raise missing_data(self.name, [path], f"download '{path.name}' (SVHN format 2) into {self.root}, "
                               "or set data.download = true in the recipe")
        import scipy.io
        try:
            mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
            x, y = np.asarray(mat["X"], dtype=np.uint8), np.asarray(mat["y"], dtype=np.int64).reshape(-1)
            if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
                raise ValueError(f"X has shape {x.shape} for {len(y)} labels")
        except Exception as exc:  # scipy raises many types (MatReadError, ValueError, OSError...) on bad files
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{path}: not a valid SVHN .mat file ({why}); download it again") from None
        # X is [H, W, C, N]; the digit 0 is stored as label 10.
        images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
        labels = np.where(y == 10, 0, y)
        return ImageData(torch.from_numpy(images), torch.from_numpy(labels), [str(d) for d in range(10)], self.name)

    def download(self) -> None:
        import torchvision
        try:
            for split in self.splits:
                torchvision.datasets.SVHN(str(self.root), split=split, download=True)
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{self.name}: download failed ({why}); download the '*_32x32.mat' files by hand "
                            f"into {self.root}") from None


@hookimpl
def rsslctl_datasets() -> list[type]:
    return [Svhn]
