"""STL-10 from the official binary release (as extracted by torchvision)."""
from __future__ import annotations

import numpy as np
import torch

from rsslctl import Dataset, ImageData, UserError, hookimpl, missing_data
from rsslctl_plugins.datasets.options import CITATION

_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_PIXELS = 3 * 96 * 96


class Stl10(Dataset):
    """STL-10: 96x96 colour images, 5,000 train / 8,000 test in 10 classes and 100,000 unlabeled."""

    name = "stl10"
    citation = CITATION["stl10"]
    splits = ("train", "test", "unlabeled")

    #: the fine-tuning tables distinguish STL-10 at its own size (self-task) from STL-10 at 32 px (cross-task)
    finetune_columns, finetune_order = {"STL-10 96px": 96, "STL-10 32px": 0}, 30

    def load(self, split: str) -> ImageData:
        if split not in self.splits:
            raise UserError(f"{self.name}: unknown split '{split}'; valid splits: {', '.join(self.splits)}")
        folder = self.root / "stl10_binary"
        paths = [folder / f"{split}_X.bin"] + ([folder / f"{split}_y.bin"] if split != "unlabeled" else [])
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise missing_data(self.name, missing, f"download 'stl10_binary.tar.gz' and extract it under {self.root}, "
                               "or set data.download = true in the recipe")
        raw = np.fromfile(paths[0], dtype=np.uint8)
        if raw.size % _PIXELS:
            raise UserError(f"{paths[0]}: truncated file ({raw.size} bytes is not a whole number of "
                            f"{_PIXELS}-byte images); re-extract the archive")
        # Images are stored column-major (MATLAB order): swap the last two axes to get [C, H, W].
        images = np.ascontiguousarray(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))
        if split == "unlabeled":
            labels = np.full(len(images), -1, dtype=np.int64)
        else:
            labels = np.fromfile(paths[1], dtype=np.uint8).astype(np.int64) - 1  # stored as 1..10
            if len(labels) != len(images) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
                raise UserError(f"{paths[1]}: corrupted labels ({len(labels)} labels for {len(images)} images, "
                                "expected values 1..10); re-extract the archive")
        names = folder / "class_names.txt"
        classes = [n.strip() for n in names.read_text().splitlines() if n.strip()] if names.is_file() else _CLASSES
        return ImageData(torch.from_numpy(images), torch.from_numpy(labels), list(classes), self.name)

    def download(self) -> None:
        import torchvision
        try:
            torchvision.datasets.STL10(str(self.root), split="train", download=True)
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{self.name}: download failed ({why}); download 'stl10_binary.tar.gz' by hand "
                            f"and extract it under {self.root}") from None


@hookimpl
def rsslctl_datasets() -> list[type]:
    return [Stl10]
