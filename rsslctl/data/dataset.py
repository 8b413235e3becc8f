"""Datasets as in-memory uint8 tensors, per-image sources for the streamed path (see ``stream``), shared helpers for
loaders (missing files, safe unpickling, resizing)."""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from rsslctl.base.errors import DataMissing, UserError
from rsslctl.base.options import Plugin
from rsslctl.data.decode import as_path, decode_bytes, decode_file, fit, image_format, is_jpeg, read_bytes


@dataclasses.dataclass
class ImageData:
    """A whole split in memory: images uint8 [N, C, H, W], labels int64 [N] (-1 = unlabeled)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: torch.Tensor | list[int]) -> "ImageData":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageData(self.images[index], self.labels[index], self.classes, self.name)

    def resized(self, size: int) -> "ImageData":
        """Images at ``size``×``size`` (antialiased bilinear), kept as uint8."""
        if self.images.shape[-1] == size and self.images.shape[-2] == size:
            return self
        return ImageData(resize_images(self.images, size), self.labels, self.classes, self.name)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, C, H, W] → uint8 [N, C, size, size], antialiased bilinear. Each image is resized on its own (the
    chunking only bounds memory), so the streamed path, which resizes image by image, gets the same pixels."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    per_image = images.shape[1] * max(size * size, images.shape[-1] * images.shape[-2]) * 4
    for chunk in images.split(max(1, min(1024, (256 << 20) // max(1, per_image)))):  # ≤ ~256 MB of floats
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


class ImageSource:
    """A split read one image at a time, for the streamed path: labels (and classes) are known up front, pixels
    are decoded on demand in DataLoader workers. Subclasses must be picklable (workers may be spawned): hold paths,
    and open files lazily in ``read``."""

    def __init__(self, labels: torch.Tensor, classes: list[str], name: str, channels: int = 3) -> None:
        self.labels, self.classes, self.name, self.channels = labels, classes, name, channels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def read(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 [C, H, W] at the size the plugin's ``load`` would give it; raise ``UserError``
        (one line naming the file) when it cannot be read."""
        raise NotImplementedError

    def fetch(self, i: int) -> tuple[str, torch.Tensor]:
        """(what to name in an error, image ``i``) for a streamed path that decodes JPEGs on the GPU: the image
        decoded as ``read`` gives it, or a JPEG file's undecoded bytes (a 1-D uint8 tensor) for the device to decode
        and bring to ``decoded_size``. The default decodes on the host."""
        return self.name, self.read(i)

    #: the square size ``read`` gives images (for images the device decodes from ``fetch``'s bytes)
    decoded_size: int = 0


class FileSource(ImageSource):
    """Image files decoded on demand (``decode_file``) at ``size`` px. The paths are one numpy bytes array, not a
    list of Python strings: forked workers then share its pages instead of copying them as they touch each string's
    reference count (a known DataLoader memory growth with million-file lists), and it pickles compactly when
    workers are spawned."""

    def __init__(self, files: list[Path], labels: torch.Tensor, classes: list[str], name: str, size: int) -> None:
        super().__init__(labels, classes, name)
        self.files, self.decoded_size = np.array([os.fsencode(f) for f in files], dtype=bytes), size

    def read(self, i: int) -> torch.Tensor:
        return decode_file(as_path(self.files[i]), self.decoded_size)

    def fetch(self, i: int) -> tuple[str, torch.Tensor]:
        path = as_path(self.files[i])
        data = read_bytes(path)
        if is_jpeg(data) and image_format(path, data) in ("JPEG", "MPO"):  # header checked here (bombs, junk)
            return str(path), data
        return str(path), fit(decode_bytes(path, data), self.decoded_size)


class HostSource(ImageSource):
    """A split loaded whole into host memory, streamed from there (datasets without a per-image reader)."""

    def __init__(self, data: ImageData) -> None:
        super().__init__(data.labels, data.classes, data.name, int(data.images.shape[1]))
        self.images = data.images  # forked workers share its pages copy-on-write (never written)

    def read(self, i: int) -> torch.Tensor:
        return self.images[i]


class Dataset(Plugin):
    """Base class of dataset plugins. Subclasses set ``name``, ``splits`` and implement ``load``."""

    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    #: sub-folder of the data root holding this dataset's corrupted test set (e.g. CIFAR-10-C); '' = none
    corruption_folder: ClassVar[str] = ""

    def __init__(self, options: Any, root: Path) -> None:
        self.options = options
        self.root = Path(root)

    def load(self, split: str) -> ImageData:
        """Return the split; raise ``missing_data(...)`` when its files are absent."""
        raise NotImplementedError

    @classmethod
    def source(self, split: str) -> ImageSource | None:
        """The split as a per-image ``ImageSource`` for the streamed path, without decoding it; None (the
        default) = no per-image reader, so a streamed run loads the split whole into host memory first."""
        return None

    #: the columns of the fine-tuning hyper-parameter tables (``Method.finetune_rows``) that belong to this dataset,
    #: as {column title: smallest data.image_size it applies from}: a run reads the column with the largest size ≤
    #: its image size. The tables' positional layout (``rsslctl.cells``) orders all installed datasets' columns by
    #: that size, largest first, within a dataset, and datasets by ``finetune_order``. {} = no column of its own
    #: (the first column is used, and the run says so).
    finetune_columns: ClassVar[dict[str, int]] = {}
    #: where this dataset's columns stand in the positional layout of the tables (lower = further left)
    finetune_order: ClassVar[int] = 0

    @classmethod
    def hyperparameter_column(cls, image_size: int) -> str:
        """The column of ``finetune_columns`` that applies to this dataset at ``image_size``; '' = none."""
        fitting = [(size, title) for title, size in cls.finetune_columns.items() if size <= image_size]
        return max(fitting)[1] if fitting else ""

    def download(self) -> None:
        """Fetch the files into ``self.root`` in the format ``load`` reads (only when the user asks)."""
        raise UserError(f"{self.name}: this dataset cannot be downloaded by rsslctl; place its files under {self.root}")


def missing_data(dataset: str, looked_for: list[Path], how: str) -> UserError:
    """The one-line error for absent dataset files: what, where we looked, how to get them (a ``DataMissing``)."""
    shown = str(Path(looked_for[0]).resolve())
    more = f" (and {len(looked_for) - 1} more)" if len(looked_for) > 1 else ""
    return DataMissing(f"{dataset}: data files not found: looked for {shown}{more}; {how}")


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays (dataset batches), never arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
        ("builtins", "bytes"), ("builtins", "bytearray"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def safe_unpickle(path: Path) -> Any:
    """Load a dataset batch stored as a pickle (CIFAR python version, ImageNet-32) without executing code."""
    try:
        with open(path, "rb") as fh:
            return _SafeUnpickler(io.BytesIO(fh.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, OverflowError, MemoryError, TypeError,
            AttributeError, IndexError, KeyError, RecursionError) as exc:
        raise UserError(f"{path}: not a valid dataset batch file ({exc}); re-extract the archive") from None
