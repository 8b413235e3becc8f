"""Decode throughput: torchvision ImageFolder + DataLoader (PIL) against rsslctl's streamed path, same files.

  python benchmarks/bench_decode.py                          # 512 JPEGs, 224 px and 64 px, 2 workers, 5 rounds
  python benchmarks/bench_decode.py --device cuda            # adds the nvJPEG path (data.decode_on_device = true)

Synthetic ImageNet-like JPEGs (500×375, quality 90, smooth content plus noise) are written once to a temporary
ImageFolder layout. Per target size, each round reads one shuffled epoch in minibatches of ``--batch`` through

* ``torchvision``: ``torchvision.datasets.ImageFolder`` with PIL's antialiased bicubic ``Resize`` and
  ``PILToTensor``, one ``DataLoader`` with ``--workers`` persistent workers for all rounds (what a training script
  does at its best): what the resident loader used to do per image;
* ``rsslctl``: one ``StreamSplit`` over the ``image_folder`` plugin's ``FileSource`` (torchvision.io decode, tensor
  resize, batches decoded into shared memory, workers kept between epochs) with the same number of workers and
  the same order;
* ``rsslctl-nvjpeg`` (``--device cuda`` only): the same, decoding the JPEGs in batches on the GPU.

Both produce uint8 [B, 3, S, S] batches of the same pixels within rounding (the script checks the first batch).
The configurations alternate inside every round (the order flips each round) so that a change in machine load hits
both; it prints images/s per round, the median ratio with its min–max over rounds and the load average before and
after. Compare ratios, not images/s, and only on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from bench_stream import write_jpegs  # the same synthetic 500×375 JPEGs

from rsslctl.data.stream import StreamSplit
from rsslctl_plugins.datasets.image_folder import ImageFolder, ImageFolderOptions


def torchvision_epoch(root: Path, size: int, rows: torch.Tensor, workers: int) -> Callable[[], int]:
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize((size, size), transforms.InterpolationMode.BICUBIC),
                             transforms.PILToTensor()])
    ds = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    # one loader for every round, its workers kept between epochs, as a training script would do
    loader = torch.utils.data.DataLoader(ds, batch_sampler=rows.tolist(), num_workers=workers,
                                         persistent_workers=workers > 0)

    def run(first: list | None = None) -> int:
        n = 0
        for x, _ in loader:
            if first is not None and not first:
                first.append(x)
            n += x.shape[0]
        return n
    return run


def rsslctl_epoch(root: Path, size: int, rows: torch.Tensor, workers: int, device: torch.device,
                  on_device: bool) -> Callable[[], int]:
    source = ImageFolder(ImageFolderOptions(image_size=size), root).source("train")
    split = StreamSplit(source, size, workers=workers, decode_on_device=on_device)  # one per run, as in training

    def run(first: list | None = None) -> int:
        n = 0
        for x, _ in split.batches(rows, device):
            if first is not None and not first:
                first.append(x.cpu())
            n += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sizes", default="224,64")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu, or cuda to add the nvJPEG configuration")
    a = p.parse_args()
    device = torch.device(a.device)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; torch {torch.__version__}; "
          f"{os.cpu_count()} CPUs; {a.workers} workers per loader; device {device}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root, a.images)
        kb = sum(f.stat().st_size for f in root.rglob("*.jpg")) / a.images / 1024
        print(f"{a.images} JPEGs of 500x375, {kb:.0f} kB each on average; minibatches of {a.batch}")
        steps = a.images // a.batch
        # ImageFolder sorts like the plugin (class folders, then files): the same index is the same file on both
        rows = torch.randperm(a.images, generator=torch.Generator().manual_seed(0))[: steps * a.batch].view(steps, -1)
        for size in [int(s) for s in a.sizes.split(",")]:
            configs = {"torchvision": torchvision_epoch(root, size, rows, a.workers),
                       "rsslctl": rsslctl_epoch(root, size, rows, a.workers, device, False)}
            if device.type == "cuda":
                configs["rsslctl-nvjpeg"] = rsslctl_epoch(root, size, rows, a.workers, device, True)
            firsts = {name: [] for name in configs}
            for name, run in configs.items():
                run(firsts[name])  # warm-up round (page cache, imports), also the pixel check
            ref = firsts["torchvision"][0].int()
            for name, (x,) in firsts.items():
                print(f"  {size} px {name}: max |pixel - torchvision| = {int((x.int() - ref).abs().max())}")
            speed: dict[str, list[float]] = {name: [] for name in configs}
            for r in range(a.rounds):
                for name in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
                    t0 = time.perf_counter()
                    n = configs[name]()
                    speed[name].append(n / (time.perf_counter() - t0))
            for name, v in speed.items():
                print(f"{size} px {name:>15}: {statistics.median(v):8,.0f} images/s (rounds: "
                      f"{', '.join(f'{s:,.0f}' for s in v)})")
            for name in [n for n in configs if n != "torchvision"]:
                ratios = [s / t for s, t in zip(speed[name], speed["torchvision"])]
                print(f"{size} px {name} / torchvision: {statistics.median(ratios):.2f}x "
                      f"(min {min(ratios):.2f}, max {max(ratios):.2f} over {a.rounds} rounds)")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
