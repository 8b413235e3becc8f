"""Engine speed, measured side by side in one process: prints images/s and ratios.

  python benchmarks/bench_engine.py                       # CPU, narrow ResNet-18, quick
  python benchmarks/bench_engine.py --width 64 --batch 512 --compile   # full ResNet-18 (e.g. on a GPU)

Sections:
  1. fwd+bwd throughput of the backbone: NCHW fp32 / channels_last fp32 / channels_last bf16 [/ compiled]
  2. ACL step (5-step contrastive PGD on both views + clean and adversarial training passes):
     reference-style attack (backward through the whole model, weight grads discarded) vs the
     engine's input-only attack gradients, both fp32 and bf16
  3. engine overhead: Trainer.fit on a resident synthetic dataset vs a hand-written loop of the same ACL math
Each configuration is timed as the median of --repeats measurements after warm-up.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

from rsslctl.attack import eval_mode, project
from rsslctl.encoder import EncoderOptions, Encoder, apply_cifar_stem
from rsslctl.losses import nt_xent


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_encoder(width: int, device, channels_last: bool, dual: bool = True) -> Encoder:
    chans = tuple(width * m for m in (1, 2, 4, 8))
    backbone = apply_cifar_stem(timm.create_model("resnet18", num_classes=0, channels=chans))
    enc = Encoder(backbone, EncoderOptions(head_layers=3), dual_bn=dual).to(device)
    return enc.to(memory_format=torch.channels_last) if channels_last else enc


def amp(device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def acl_step(enc, opt, views, steps: int, input_only: bool, bf16: bool, device) -> None:
    eps, alpha = 8 / 255, 2 / 255
    x = views
    with eval_mode(enc):
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            with amp(device, bf16):
                loss = nt_xent(enc(x_adv, "pgd"))
            if input_only:
                (g,) = torch.autograd.grad(loss, x_adv)
            else:  # reference style: full backward, weight gradients computed and thrown away
                enc.zero_grad()
                loss.backward()
                g = x_adv.grad
            x_adv = project(x, x_adv.detach() + alpha * g.sign(), eps, "linf")
    with amp(device, bf16):
        loss = 0.5 * (nt_xent(enc(x, "normal")) + nt_xent(enc(x_adv.detach(), "pgd")))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 base width (64 = standard)")
    ap.add_argument("--batch", type=int, default=128, help="images per step (ACL uses 2 views each)")
    ap.add_argument("--pgd-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to warm up)")
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    n = args.batch
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, ResNet-18 width {args.width}, batch {n}")

    print("\n1. backbone fwd+bwd, images/s")
    rows = {}
    configs = [("NCHW fp32", False, False, False), ("channels_last fp32", True, False, False),
               ("channels_last bf16", True, True, False)]
    if args.compile:
        configs.append(("channels_last bf16 compiled", True, True, True))
    for name, cl, bf16, comp in configs:
        enc = make_encoder(args.width, device, cl, dual=False)
        if comp:
            enc.backbone.compile()
        x = torch.rand(n, 3, 32, 32, device=device)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)

        def step():
            with amp(device, bf16):
                out = enc(x)
            out.float().square().mean().backward()
        t = timeit(step, device, 3 if not comp else 5, args.repeats)
        rows[name] = n / t
        print(f"  {name:32s} {n / t:10.0f} img/s   x{rows[name] / rows['NCHW fp32']:.2f} vs NCHW fp32")

    print(f"\n2. ACL step ({args.pgd_steps}-step PGD on both views), images/s")
    acl = {}
    for bf16 in (False, True):
        for input_only in (False, True):
            enc = make_encoder(args.width, device, True)
            opt = torch.optim.SGD(enc.parameters(), lr=0.1, momentum=0.9)
            views = torch.rand(2 * n, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
            t = timeit(lambda: acl_step(enc, opt, views, args.pgd_steps, input_only, bf16, device), device, 2, args.repeats)
            key = ("bf16" if bf16 else "fp32", "input-only" if input_only else "reference")
            acl[key] = n / t
            print(f"  {key[0]} {key[1]:11s} attack {n / t:10.1f} img/s")
        p = "bf16" if bf16 else "fp32"
        print(f"  -> input-only / reference ({p}): x{acl[(p, 'input-only')] / acl[(p, 'reference')]:.2f}")
    print(f"  -> bf16 input-only / fp32 reference: x{acl[('bf16', 'input-only')] / acl[('fp32', 'reference')]:.2f}")

    if args.skip_engine:
        return
    print("\n3. engine overhead: Trainer (ACL plugin, augmentation off) vs hand-written loop, same math")
    from rsslctl.engine import Trainer
    from rsslctl.recipe import resolve
    import rsslctl.build as build_mod
    from rsslctl.data import ImageData
    steps = max(3, args.repeats)
    images = torch.randint(0, 256, (n * steps, 3, 32, 32), dtype=torch.uint8)
    data = ImageData(images, torch.zeros(len(images), dtype=torch.long), ["x"], "synthetic")
    build_mod.load_split = lambda recipe, split: data  # resident synthetic data, no files
    raw = {"data": {"name": "digits"}, "backbone": {"model_kwargs": {"channels": [args.width * m for m in (1, 2, 4, 8)]}},
           "encoder": {"head_layers": 3}, "method": {"name": "acl"}, "attack": {"steps": args.pgd_steps},
           "augment": {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0},
           "optimizer": {"name": "sgd", "lr": 0.01}, "schedule": {"epochs": 2, "batch_size": n, "warmup_epochs": 0},
           "engine": {"device": str(device), "precision": "bf16", "log_every": 50, "checkpoint_every": 1000}}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(resolve(raw), Path(tmp), quiet=True)
        summary = trainer.fit()
        engine_ips = summary["images_per_s"]  # second epoch (first includes warm-up)
    enc = make_encoder(args.width, device, True)
    opt = torch.optim.SGD(enc.parameters(), lr=0.01, momentum=0.9)
    batch = images[:n].to(device)

    def hand():
        views = batch.repeat_interleave(2, 0).float().div(255).contiguous(memory_format=torch.channels_last)
        acl_step(enc, opt, views, args.pgd_steps, True, True, device)
    raw_ips = n / timeit(hand, device, 2, steps)
    print(f"  engine {engine_ips:10.1f} img/s   hand-written {raw_ips:10.1f} img/s   "
          f"engine overhead {100 * (raw_ips / engine_ips - 1):+.1f} %")


if __name__ == "__main__":
    main()
