"""CIFAR-10 and CIFAR-100 from the official python (pickled) or binary releases."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rsslctl import Dataset, ImageData, UserError, hookimpl, missing_data, safe_unpickle
from rsslctl_plugins.datasets.options import CITATION, Cifar100Options


def _get(d: dict, key: str) -> Any:
    # Python-3 pickles have bytes keys; the official Python-2 files load (latin1) with str keys.
    return d[key.encode()] if key.encode() in d else d[key]


class _Cifar(Dataset):
    title, pydir, bindir, files, metas = "", "", "", {}, ("", "")  # metas: python, binary label-name files

    def _kind(self) -> str:
        """Label set: '' for CIFAR-10, 'fine' or 'coarse' for CIFAR-100."""
        return ""

    def load(self, split: str) -> ImageData:
        if split not in self.splits:
            raise UserError(f"{self.name}: unknown split '{split}'; valid splits: {', '.join(self.splits)}")
        kind = self._kind()
        py, binary = self.root / self.pydir, self.root / self.bindir
        use_py = py.is_dir() or not binary.is_dir()  # prefer the python release, as torchvision does
        folder = py if use_py else binary
        meta = self.metas[not use_py].format(kind=kind)
        paths = [folder / (f if use_py else f + ".bin") for f in self.files[split]] + [folder / meta]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise missing_data(self.name, missing if folder.is_dir() else [py, binary],
                               f"download the '{self.title} python version' and extract it under {self.root}, "
                               "or set data.download = true in the recipe")
        try:
            if use_py:
                batches = [safe_unpickle(p) for p in paths[:-1]]
                data = np.concatenate([np.asarray(_get(b, "data"), dtype=np.uint8) for b in batches])
                lkey = f"{kind}_labels" if kind else "labels"
                labels = np.concatenate([np.asarray(_get(b, lkey), dtype=np.int64) for b in batches])
                names = _get(safe_unpickle(paths[-1]), f"{kind}_label_names" if kind else "label_names")
                classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            else:
                head = 2 if kind else 1  # CIFAR-100 records: coarse byte, fine byte, pixels
                raw = np.concatenate([np.fromfile(p, dtype=np.uint8) for p in paths[:-1]])
                if raw.size % (3072 + head):
                    raise ValueError(f"{raw.size} bytes is not a whole number of {3072 + head}-byte records")
                rec = raw.reshape(-1, 3072 + head)
                data, labels = rec[:, head:], rec[:, 0 if kind != "fine" else 1].astype(np.int64)
                classes = [n.strip() for n in paths[-1].read_text().splitlines() if n.strip()]
            images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32))  # rows hold R, G, B planes, row-major
            if len(images) != len(labels):
                raise ValueError(f"{len(images)} images but {len(labels)} labels")
            if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
                raise ValueError(f"labels outside 0..{len(classes) - 1}")
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError, IndexError, MemoryError) as exc:
            raise UserError(f"{folder}: corrupted {self.title} files ({exc}); re-extract the archive") from None
        return ImageData(torch.from_numpy(images), torch.from_numpy(labels), classes, self.name)

    def download(self) -> None:
        import torchvision
        try:
            getattr(torchvision.datasets, self.title.replace("-", ""))(str(self.root), download=True)
        except Exception as exc:  # network, disk or checksum failures: all mean "get the files by hand"
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{self.name}: download failed ({why}); get the '{self.title} python version' "
                            f"by hand and extract it under {self.root}") from None


class Cifar10(_Cifar):
    """CIFAR-10: 50,000 train / 10,000 test 32x32 colour images in 10 classes (python or binary release)."""

    name, title, pydir, bindir = "cifar10", "CIFAR-10", "cifar-10-batches-py", "cifar-10-batches-bin"
    finetune_columns, finetune_order = {"CIFAR-10": 0}, 10
    citation = CITATION["cifar10"]
    corruption_folder = "CIFAR-10-C"
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    metas = ("batches.meta", "batches.meta.txt")


class Cifar100(_Cifar):
    """CIFAR-100: 50,000 train / 10,000 test 32x32 colour images in 100 classes (python or binary release)."""

    name, title, pydir, bindir = "cifar100", "CIFAR-100", "cifar-100-python", "cifar-100-binary"
    finetune_columns, finetune_order = {"CIFAR-100": 0}, 20
    citation = CITATION["cifar100"]
    corruption_folder = "CIFAR-100-C"
    files, metas = {"train": ["train"], "test": ["test"]}, ("meta", "{kind}_label_names.txt")
    Options = Cifar100Options

    def _kind(self) -> str:
        return getattr(self.options, "labels", "fine")


@hookimpl
def rsslctl_datasets() -> list[type]:
    return [Cifar10, Cifar100]
