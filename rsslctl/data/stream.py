"""The streamed data path: a split too large to sit on the device is decoded from disk by DataLoader workers.

The resident path (the whole split on the device as uint8, minibatches gathered by index) stays the default and
is untouched. The streamed path feeds the same loop the same thing: per step, a uint8 [B, C, S, S] batch on the
device holding exactly the images the resident path would gather for that step (the engine's per-epoch
permutation decides both), so the method's on-device ``ViewAugment`` sees identical inputs and draws identical
views; exact resume needs nothing more than the epoch's permutation (derived from the seed) and the position in
it (``start``). The host never waits for the device: workers decode ahead (``prefetch_factor``), batches are
pinned and copied with ``non_blocking=True`` one step ahead of their use, and the loader draws its own seed from a
private generator, never from torch's global RNG (which the augmentation consumes).

Under torchrun each rank reads only its contiguous share of every global minibatch (``local_rows``, applied in
``epoch_batches`` to both paths).
"""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from rsslctl.base.errors import UserError
from rsslctl.base.limits import memory_bytes
from rsslctl.data.dataset import ImageSource, resize_images
from rsslctl.data.decode import decode_on_device

#: images per worker task when gathering arbitrary indices (coreset selection)
GATHER_CHUNK = 256


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun (RANK / WORLD_SIZE), (0, 1) otherwise. The one place the
    streamed path asks; ``rsslctl.runtime.distributed`` replaces it once the DDP engine is in."""
    try:
        return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise UserError("RANK / WORLD_SIZE are set but are not integers; launch with torchrun") from None


def local_rows(rows: Tensor, rank: int, world: int) -> Tensor:
    """This rank's contiguous share of every global minibatch: [steps, B] → [steps, B / world]."""
    if rows.shape[1] % world:
        raise UserError(f"schedule.batch_size = {rows.shape[1]} does not divide by the {world} processes; "
                        f"use a multiple of {world}")
    per = rows.shape[1] // world
    return rows[:, rank * per:(rank + 1) * per]


def device_memory(device: torch.device) -> int:
    """Bytes of memory of ``device`` (host memory for the CPU), 0 when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return memory_bytes() if device.type == "cpu" else 0


def npz_memmap(path: Path, key: str) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, byte offset) of array ``key`` inside an ``.npz`` when it is stored uncompressed (plain
    ``np.savez``), so it can be memory-mapped; None when it is compressed or not a C-ordered array."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        head = fh.read(30)  # local file header: name and extra-field lengths are its last two fields
        if head[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        if fortran or dtype.hasobject:
            return None
        return dtype, tuple(shape), fh.tell()


class _Rows(torch.utils.data.Dataset):
    """Item = one minibatch, named by its index tensor: (uint8 images [B, C, S, S], labels [B]) or, when a file
    cannot be read, the error's one line (an exception would reach the main process as a multi-line worker
    traceback)."""

    def __init__(self, source: ImageSource, size: int, fetch: bool = False) -> None:
        self.source, self.size, self.fetch = source, size, fetch

    def __getitem__(self, idx: Tensor) -> tuple[Any, Tensor] | str:
        try:
            if self.fetch:  # JPEG bytes stay encoded: the training process decodes them on the GPU
                return [self.source.fetch(int(i)) for i in idx], self.source.labels[idx]
            images = self._decoded(idx)
        except UserError as exc:
            return str(exc)
        return resize_images(images, self.size), self.source.labels[idx]

    def _decoded(self, idx: Tensor) -> Tensor:
        """The images decoded straight into one batch tensor, in shared memory inside a worker: the batch then
        crosses to the training process without the copy that sending an ordinary tensor costs."""
        first = torch.as_tensor(self.source.read(int(idx[0])))
        out = torch.empty((len(idx), *first.shape), dtype=first.dtype)
        if torch.utils.data.get_worker_info() is not None:
            out.share_memory_()
        out[0] = first
        for j in range(1, len(idx)):
            out[j] = torch.as_tensor(self.source.read(int(idx[j])))
        return out


class _Minibatches(torch.utils.data.Sampler):
    """The index tensors ``rows[start:]`` of the epoch being read; set anew before every epoch, so one loader
    (and its worker processes) serves every epoch of a run."""

    def __init__(self) -> None:
        self.rows, self.start = torch.zeros((0, 0), dtype=torch.long), 0

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.rows[self.start:])

    def __len__(self) -> int:
        return max(0, len(self.rows) - self.start)


def _on_device(items: list[tuple[str, Tensor]], decoded_size: int, size: int, device: torch.device) -> Tensor:
    """One minibatch from ``ImageSource.fetch`` items: the JPEG bytes decoded together on ``device``, the images
    the workers decoded copied there, all at ``size`` px in their original order."""
    jpegs = [k for k, (_, t) in enumerate(items) if t.ndim == 1]
    out = torch.empty((len(items), 3, decoded_size, decoded_size), dtype=torch.uint8, device=device)
    if jpegs:
        out[jpegs] = decode_on_device([items[k][0] for k in jpegs], [items[k][1] for k in jpegs], decoded_size,
                                      device)
    for k, (_, t) in enumerate(items):
        if t.ndim != 1:
            out[k] = t.to(device, non_blocking=True)
    return resize_images(out, size)


def _as_is(batch: Any) -> Any:
    return batch


class StreamSplit:
    """A training split read through DataLoader workers; ``batches`` yields device minibatches in a given order."""

    def __init__(self, source: ImageSource, size: int, limit: int = 0, workers: int = 4,
                 decode_on_device: bool = False) -> None:
        self.source, self.size, self.workers = source, size, workers
        # nvJPEG only where the source can hand over JPEG bytes (it sets decoded_size) and only on CUDA (batches)
        self.decode_on_device = decode_on_device and bool(source.decoded_size)
        n = min(limit, len(source)) if limit else len(source)
        self.labels, self.classes, self.name = source.labels[:n], source.classes, source.name
        self.shape = (n, source.channels, size, size)
        self._epochs: dict[tuple[bool, bool], tuple[torch.utils.data.DataLoader, _Minibatches]] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def _loader(self, sampler: Any, pin: bool, fetch: bool = False, persistent: bool = False
                ) -> torch.utils.data.DataLoader:
        workers = self.workers
        return torch.utils.data.DataLoader(
            _Rows(self.source, self.size, fetch), batch_size=None, sampler=sampler, num_workers=workers,
            collate_fn=_as_is, pin_memory=pin, prefetch_factor=4 if workers else None,
            persistent_workers=persistent and workers > 0,
            generator=torch.Generator().manual_seed(0))  # a private generator: torch's global RNG is not touched

    def _epoch_loader(self, rows: Tensor, start: int, pin: bool, fetch: bool) -> torch.utils.data.DataLoader:
        """The run's training loader, made once: its workers stay up between epochs (starting them again every
        epoch cost a tenth of a second or more per epoch in warm-up alone)."""
        if (pin, fetch) not in self._epochs:
            sampler = _Minibatches()
            self._epochs[pin, fetch] = self._loader(sampler, pin, fetch, persistent=True), sampler
        loader, sampler = self._epochs[pin, fetch]
        sampler.rows, sampler.start = rows, start
        return loader

    def batches(self, rows: Tensor, device: torch.device, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Minibatches ``rows[start:]`` (indices [steps, b]) on ``device``, each copied one step ahead of its use."""
        rows = rows.cpu()
        pending: tuple[Tensor, Tensor] | None = None
        fetch = self.decode_on_device and device.type == "cuda"
        for item in self._epoch_loader(rows, start, device.type == "cuda", fetch):
            if isinstance(item, str):
                raise UserError(item)
            x, y = item
            x = _on_device(x, self.source.decoded_size, self.size, device) if fetch else x
            ready = (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            if pending is not None:
                yield pending
            pending = ready
        if pending is not None:
            yield pending

    def gather(self, index: Tensor) -> Tensor:
        """uint8 images [len(index), C, S, S] on the host, decoded by the workers (coreset selection)."""
        rows = list(index.cpu().view(-1).split(GATHER_CHUNK))
        if not rows:
            return torch.zeros((0, *self.shape[1:]), dtype=torch.uint8)
        out = []
        for k, item in enumerate(self._loader(list(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)), False)):
            if isinstance(item, str):
                raise UserError(item)
            out.append(item[0][: len(rows[k])])
        return torch.cat(out)


class StreamedImages:
    """The streamed split where code expects resident images: ``images[idx]`` decodes on demand and returns them
    on the device (coreset selection indexes its pool this way). Reading back ``idx`` syncs; it is never used
    inside a training step."""

    def __init__(self, split: StreamSplit, device: torch.device) -> None:
        self.split, self.device, self.shape, self.dtype = split, device, torch.Size(split.shape), torch.uint8

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        return self.split.gather(torch.as_tensor(index)).to(self.device)


def epoch_batches(train: Any, images: Any, labels: Tensor, rows: Tensor, device: torch.device, start: int = 0
                  ) -> Iterator[tuple[Tensor, Tensor]]:
    """This process's share of the engine's minibatches ``rows[start:]`` (global indices [steps, B]) of one epoch:
    gathered on the device from the resident split, or streamed. The one place where ranks split the global batch."""
    rows = local_rows(rows, *rank_world())
    if isinstance(train, StreamSplit):
        yield from train.batches(rows, device, start)
        return
    for idx in rows[start:].to(device):
        yield images[idx], labels[idx]


def on_device(train: Any, device: torch.device) -> tuple[Any, Tensor]:
    """(images, labels) for the engine: the resident split copied to the device, or a ``StreamedImages`` view."""
    if isinstance(train, StreamSplit):
        return StreamedImages(train, device), train.labels.to(device)
    return train.images.to(device), train.labels.to(device)
