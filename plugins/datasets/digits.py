"""scikit-learn's bundled handwritten digits (offline; no files needed)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rsslctl import Dataset, ImageData, UserError, hookimpl
from rsslctl_plugins.datasets.options import CITATION


class Digits(Dataset):
    """Handwritten digits bundled with scikit-learn: 1,797 images, 10 classes, as 32x32 RGB.

    The 8x8 originals (values 0..16) are scaled to 0..255 (``round(v*255/16)``), grey is
    replicated to 3 channels, and images are upsampled 8->32 with bilinear interpolation
    (``align_corners=False``, no antialias: it only matters when downsampling), rounded to uint8.
    The split is fixed: ``train_test_split(indices, test_size=0.25, random_state=0,
    stratify=labels)`` gives 1,347 train / 450 test images. ``data.root`` is ignored.
    """

    name = "digits"
    citation = CITATION["digits"]
    splits = ("train", "test")

    def load(self, split: str) -> ImageData:
        if split not in self.splits:
            raise UserError(f"{self.name}: unknown split '{split}'; valid splits: {', '.join(self.splits)}")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        labels = np.asarray(bunch.target, dtype=np.int64)
        train, test = train_test_split(np.arange(len(labels)), test_size=0.25, random_state=0, stratify=labels)
        index = np.sort(train if split == "train" else test)
        grey = torch.from_numpy(np.rint(bunch.images[index] * 255.0 / 16.0)).float().unsqueeze(1)
        big = F.interpolate(grey, size=(32, 32), mode="bilinear", align_corners=False)
        images = big.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        return ImageData(images, torch.from_numpy(labels[index]), [str(d) for d in range(10)], self.name)


@hookimpl
def rsslctl_datasets() -> list[type]:
    return [Digits]
