"""Bytes each rank communicates per ACL step under torchrun, from the real models, and a gloo check on the CPU.

    python benchmarks/bench_ddp.py              # table for docs/distributed.md (counts only, no training)
    python benchmarks/bench_ddp.py --measure    # + 1 and 2 gloo processes on the tiny digits model: time per step,
                                                #   and bytes counted in the collectives vs the formula

The formula (per rank, per optimizer step of ACL-DS with K PGD steps, local batch b images → 2b views, embedding
width d, P trainable parameters, fp32): embedding all-gathers 2(K+2) × (W−1)·2b·d·4 (K attack forwards + clean and
adversarial loss, each gathered forward and reduce-scattered backward); gradient all-reduce (ring) 2(W−1)/W · 4P;
sync BN (nn.SyncBatchNorm): per BN layer of one route and per training-mode forward (2 per step), an all-gather of
(2C+1) floats from every rank and an all-reduce of 2C; without sync BN a broadcast of the BN buffers (4 · 2C_all).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from timing import load_average, spread
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def model_counts(model: str, size: int, cifar_stem: bool, head_layers: int = 3) -> dict[str, int]:
    """(trainable parameters, BN layers and channels of one route, embedding width) of ACL's dual-BN encoder."""
    from rsslctl.run.recipe import resolve
    raw = {"data": {"name": "digits", "image_size": size},
           "backbone": {"name": "timm", "model": model, "cifar_stem": cifar_stem},
           "encoder": {"head_layers": head_layers}, "method": {"name": "acl"}, "attack": {"name": "pgd"}}
    from rsslctl.run.build import build_method
    method = build_method(resolve(raw, [], "bench"), torch.device("meta"))
    from rsslctl.nn.encoder import DualBatchNorm
    bns = [m.bn_list[0] for m in method.modules() if isinstance(m, DualBatchNorm)]
    head_out = [m for m in method.encoder.head.modules() if isinstance(m, nn.Linear)][-1].out_features
    return {"params": sum(p.numel() for p in method.parameters() if p.requires_grad), "bn_layers": len(bns),
            "bn_channels": sum(bn.num_features for bn in bns), "dim": head_out}


def step_bytes(c: dict[str, int], world: int, local_batch: int, pgd_steps: int = 5) -> dict[str, float]:
    """Bytes received (≈ sent) by one rank per ACL step, by kind, and the number of collectives."""
    w, rows = world, 2 * local_batch
    gathers = 2 * (pgd_steps + 2) * (w - 1) * rows * c["dim"] * 4
    grads = 2 * (w - 1) / w * 4 * c["params"]
    sync_bn = 2 * ((w - 1) * (2 * c["bn_channels"] + c["bn_layers"]) * 4 + 2 * (w - 1) / w * 2 * c["bn_channels"] * 4)
    return {"gather": gathers, "grad": grads, "sync_bn": sync_bn, "bn_broadcast": 4 * 2 * 2 * c["bn_channels"],
            "collectives_sync_bn": 2 * 2 * c["bn_layers"], "collectives_other": 2 * (pgd_steps + 2) + 1}


def table() -> None:
    rows = [("CIFAR-10, 8 GPUs, ResNet-18", "resnet18", 32, True, 8, 512),
            ("CIFAR-10, 8 GPUs, ResNet-50", "resnet50", 32, True, 8, 512),
            ("ImageNet-1K 224 px, 64 GPUs, ResNet-18", "resnet18", 224, False, 64, 4096),
            ("ImageNet-1K 224 px, 64 GPUs, ResNet-50", "resnet50", 224, False, 64, 4096)]
    print("| setting | params | BN layers / channels (one route) | d | local batch | embedding gathers | "
          "gradient all-reduce | sync BN | small collectives (sync BN / other) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model, size, stem, w, gb in rows:
        c = model_counts(model, size, stem)
        b = step_bytes(c, w, gb // w)
        print(f"| {name} | {c['params'] / 1e6:.2f} M | {c['bn_layers']} / {c['bn_channels']:,} | {c['dim']} | "
              f"{gb // w} | {b['gather'] / 2**20:.1f} MiB | {b['grad'] / 2**20:.1f} MiB | {b['sync_bn'] / 2**20:.2f} "
              "MiB"
              f" | {b['collectives_sync_bn']} / {b['collectives_other']} |")


def measure() -> None:
    """Time per step with 1 and 2 gloo processes on the tiny digits model, and count the bytes of the collectives."""
    tiny = ROOT / "tests" / "conftest.py"
    sys.path.insert(0, str(tiny.parent))
    from conftest import TINY
    recipe = Path("/tmp/bench_ddp.toml")
    recipe.write_text(TINY)
    for world in (1, 2):
        port = 29500 + os.getpid() % 1000
        env = [{**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "MASTER_ADDR":
                "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"} for r in range(world)]
        procs = [subprocess.Popen([sys.executable, __file__, "--rank-worker", str(recipe)], env=e,
                                  stdout=subprocess.PIPE, text=True) for e in env]
        outs = [p.communicate()[0] for p in procs]
        print(f"world {world}: {outs[0].strip()}")


def rank_worker(recipe_path: str) -> None:
    import torch.distributed as tdist

    from rsslctl.run.recipe import load
    from rsslctl.runtime import distributed as dist
    from rsslctl.train.engine import Trainer
    counted = {"bytes": 0}
    for name in ("all_reduce", "all_gather", "all_to_all", "broadcast", "scatter"):  # gloo's all-to-all: W scatters
        original = getattr(tdist, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            t = args[1] if _name in ("all_gather", "all_to_all", "scatter") else args[0]
            tensors = t if isinstance(t, (list, tuple)) else [] if t is None else [t]
            counted["bytes"] += sum(x.numel() * x.element_size() for x in tensors)
            return _original(*args, **kwargs)
        setattr(tdist, name, counting)
    sets = ["engine.threads=1", "engine.precision='fp32'", "engine.sync_bn=true", "attack.steps=5"]
    trainer = Trainer(load(Path(recipe_path), sets), Path("/tmp/bench_ddp_run"), quiet=True)
    images, labels = trainer.train.images[:32], trainer.train.labels[:32]
    trainer.method.train()
    times = []
    for i in range(4):
        counted["bytes"] = 0
        t0 = time.perf_counter()
        trainer._step(1, i, 0, dist.shard(images), dist.shard(labels))
        times.append(time.perf_counter() - t0)
    c = {"params": sum(p.numel() for p in trainer.params), "dim": 32}
    from rsslctl.nn.encoder import DualBatchNorm
    bns = [m.bn_list[0] for m in trainer.method.modules() if isinstance(m, DualBatchNorm)]
    c.update(bn_layers=len(bns), bn_channels=sum(bn.num_features for bn in bns))
    w, rows, k = dist.world_size(), 32 * 2 // dist.world_size(), 5
    expected = 0 if w == 1 else ((k + 2) * (1 + w) * rows * c["dim"] * 4 + 4 * c["params"]
                                 + 2 * 4 * 4 * c["bn_channels"])  # gathers + all-to-all, gradients, CPU sync BN
    print(f"s/step {spread(times, digits=3)} (global batch 32, PGD-5, sync BN; {load_average()}); bytes handed to "
          f"collectives per step by one rank: counted {counted['bytes']:,}, formula {expected:,} (params "
          f"{c['params']:,}, {c['bn_layers']} BN layers / {c['bn_channels']} channels per route)")
    dist.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--rank-worker")
    a = parser.parse_args()
    if a.rank_worker:
        rank_worker(a.rank_worker)
    else:
        table()
        if a.measure:
            measure()
