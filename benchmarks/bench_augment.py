"""Throughput of the ACL 2-view augmentation on 32x32 uint8 batches of 512 images.

Usage: python benchmarks/bench_augment.py [--repeats 7] [--batch 512]
Prints views/s (median of the repeats, after a warm-up) on CPU, and on CUDA when available.
torch's thread count is left as is.
"""
from __future__ import annotations

import argparse
import time

import torch
from timing import load_average, spread

from rsslctl.data.augment import AugmentOptions, ViewAugment, multi_view


def views_per_second(device: str, batch: int, repeats: int, n_views: int = 2) -> list[float]:
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    augment = ViewAugment(32, AugmentOptions())  # ACL: s = 1, bicubic
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up
        multi_view(x, augment, n_views)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        multi_view(x, augment, n_views)
        sync()
        times.append(time.perf_counter() - start)
    return [batch * n_views / t for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    print(load_average())
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        where = f"{device} ({torch.get_num_threads()} threads)" if device == "cpu" else torch.cuda.get_device_name()
        rates = views_per_second(device, args.batch, args.repeats)
        print(f"{where}: {spread(rates, digits=0)} views/s  (2 views x {args.batch} images, 32x32 uint8)")
    print(f"after: {load_average()}")


if __name__ == "__main__":
    main()
