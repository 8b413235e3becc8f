"""Throughput of the streamed data path: images/s that DataLoader workers decode from JPEG files at 224 px.

  python benchmarks/bench_stream.py                       # 256 JPEGs of 500×375, workers 0, 1, 2
  python benchmarks/bench_stream.py --images 2048 --workers 0,4,8,16

The files are written once to a temporary ``image_folder`` layout (ImageNet-like: 500×375 JPEG, quality 90,
smooth random content so they compress like photographs, ~40–60 kB each). Each configuration reads one epoch of
shuffled minibatches through ``StreamSplit.batches`` on the CPU device (decode, bicubic resize to 224, stack, copy),
the whole path a streamed training run uses minus the GPU; the figure says how many workers a GPU needs to be fed:
a training step that takes T seconds for B images needs B / T images/s from them. The machine's load average is
printed: compare numbers only within one run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rsslctl.data.stream import StreamSplit
from rsslctl_plugins.datasets.image_folder import ImageFolder, ImageFolderOptions


def write_jpegs(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / "train" / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", default="0,1,2")
    a = p.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch {torch.__version__}; {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), a.images)
        kb = sum(f.stat().st_size for f in Path(tmp).rglob("*.jpg")) / a.images / 1024
        print(f"{a.images} JPEGs of 500x375, {kb:.0f} kB each on average")
        source = ImageFolder(ImageFolderOptions(image_size=a.size), Path(tmp)).source("train")
        steps = a.images // a.batch
        rows = torch.randperm(a.images, generator=torch.Generator().manual_seed(0))[: steps * a.batch].view(steps, -1)
        for workers in [int(w) for w in a.workers.split(",")]:
            split = StreamSplit(source, a.size, workers=workers)
            t0 = time.perf_counter()
            n = sum(x.shape[0] for x, _ in split.batches(rows, torch.device("cpu")))
            dt = time.perf_counter() - t0
            print(f"workers {workers}: {n / dt:,.0f} images/s ({dt:.2f} s for {n} images, incl. worker start)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
