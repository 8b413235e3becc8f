"""rsslctl's ACL step against a re-implementation of the reference step, and the engine against a bare loop.

  python benchmarks/bench_engine.py                                  # CPU: width-16 ResNet-18, batch 128, PGD-5
  python benchmarks/bench_engine.py --width 64 --batch 512 --compile # full ResNet-18 (e.g. on a GPU)

1. ACL-DS step, rsslctl vs reference, fp32 and bf16 autocast. "reference" is written here from the ACL paper (Jiang
   et al., NeurIPS 2020) and the way its public code computes a step: a plain CIFAR ResNet-18 (3×3 stride-1 stem, no
   max-pool, BasicBlocks 2-2-2-2) with dual BN and the 3-layer projection head; contrastive PGD on both views in eval
   mode through the pgd BN, each attack step a full ``loss.backward()`` after ``zero_grad()`` (weight gradients
   computed and thrown away), then NT-Xent of the clean views (normal BN) plus NT-Xent of the adversarial views
   (pgd BN), one backward, SGD. rsslctl is ``Trainer._step`` of the ``acl`` plugin (LR, autocast, attack with input
   gradients only, loss, backward, optimizer). Both build the same network (``backbone.stem_width`` = the first
   stage width, so no 64-wide stem and no extra 1×1 projection): the script checks that the forward FLOPs are equal.
   Both augment the same way (the batched ViewAugment, inside the timed step), so the difference is the training math
   only.
2. Engine overhead: ``Trainer._epoch`` (batch indices, LR schedule, the step, metrics read back every ``log_every``
   steps) vs a bare loop calling the same method's ``training_step``, backward and optimizer on the same batches.

Timing: ``--rounds`` interleaved rounds; in each, every configuration runs ``--steps`` steps back to back (order
reversed on every other round, so drift hits all alike) and is timed as a block. Ratios are formed within a round
and reported as median (min–max) over rounds; the per-configuration times are medians over rounds. The machine's
load average is printed before and after: compare numbers only within one run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import tempfile
import time
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rsslctl.run.build as build_mod
from rsslctl.data.augment import AugmentOptions, ViewAugment, multi_view
from rsslctl.data.dataset import ImageData
from rsslctl.run.build import compile_step
from rsslctl.run.recipe import resolve
from rsslctl.train.engine import Trainer

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# -- the reference step, from the paper ------------------------------------------------------------------------------
class DualBN(nn.Module):
    def __init__(self, bn: Callable[[int], nn.Module], c: int) -> None:
        super().__init__()
        self.bns = nn.ModuleList([bn(c), bn(c)])  # 0: clean, 1: adversarial
        self.route = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.bns[self.route](x)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = DualBN(nn.BatchNorm2d, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = DualBN(nn.BatchNorm2d, cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), DualBN(nn.BatchNorm2d, cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.short is None else self.short(x)))


class ReferenceResNet18(nn.Module):
    """CIFAR ResNet-18 with dual BN and ACL's projection head (Linear+BN+ReLU, Linear+BN+ReLU, Linear+BN)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.bn1 = DualBN(nn.BatchNorm2d, w[0])
        blocks, cin = [], w[0]
        for i, c in enumerate(w):
            blocks += [Block(cin, c, 1 if i == 0 else 2), Block(c, c, 1)]
            cin = c
        self.blocks = nn.Sequential(*blocks)
        d = w[3]
        self.head = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)])
        self.head_bn = nn.ModuleList([DualBN(nn.BatchNorm1d, d) for _ in range(3)])
        self.dual = [m for m in self.modules() if isinstance(m, DualBN)]

    def forward(self, x: Tensor, route: int = 0) -> Tensor:
        for m in self.dual:
            m.route = route
        x = F.relu(self.bn1(self.conv1((x - self.mean) / self.std)))
        x = F.adaptive_avg_pool2d(self.blocks(x), 1).flatten(1)
        for i, (lin, bn) in enumerate(zip(self.head, self.head_bn)):
            x = bn(lin(x))
            x = F.relu(x) if i < 2 else x
        return x


def reference_nt_xent(z: Tensor, tau: float = 0.5) -> Tensor:
    """SimCLR's NT-Xent over pairs (2k, 2k+1), from the formula: −log softmax over all other rows at the positive."""
    z = F.normalize(z.float(), dim=1)
    sim = (z @ z.t() / tau).masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    return F.cross_entropy(sim, torch.arange(len(z), device=z.device) ^ 1)


def reference_step(model: ReferenceResNet18, opt: torch.optim.Optimizer, augment: ViewAugment, images: Tensor,
                   steps: int, bf16: bool, eps: float = 8 / 255, alpha: float = 2 / 255) -> Tensor:
    amp = torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    views = multi_view(images, augment, 2)
    model.eval()
    x_adv = (views + torch.empty_like(views).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        model.zero_grad()
        with amp:
            loss = reference_nt_xent(model(x_adv, 1))
        loss.backward()  # weight gradients too, as the reference code does
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * x_adv.grad.sign(), views - eps), views + eps).clamp(0, 1)
    model.train()
    with amp:
        loss = 0.5 * (reference_nt_xent(model(views, 0)) + reference_nt_xent(model(x_adv.detach(), 1)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


# -- harness ---------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(configs: dict[str, Callable[[], None]], rounds: int, steps: int, warmup: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each configuration in each round (after ``warmup`` untimed steps each)."""
    for fn in configs.values():
        for _ in range(warmup):
            fn()
    sync(device)
    out: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            for _ in range(steps):
                configs[name]()
            sync(device)
            out[name].append((time.perf_counter() - t) / steps)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {out[n][-1]:.3f} s" for n in names), flush=True)
    return out


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> str:
    """median (min–max) over rounds of time[slow] / time[fast]."""
    rs = [a / b for a, b in zip(times[slow], times[fast])]
    return f"{statistics.median(rs):.2f}× ({min(rs):.2f}–{max(rs):.2f})"


def forward_flops(model: nn.Module, x: Tensor, *args) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, *args)
    model.train()
    return counter.get_total_flops()


def make_trainer(args, device: torch.device, precision: str, tmp: Path, compile_: bool = False) -> Trainer:
    chans = [args.width * m for m in (1, 2, 4, 8)]
    raw = {"data": {"name": "digits", "image_size": 32},
           "backbone": {"model_kwargs": {"channels": chans}, "stem_width": args.width},
           "encoder": {"head_layers": 3}, "method": {"name": "acl"}, "attack": {"steps": args.pgd_steps},
           "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
           "schedule": {"epochs": 1000, "batch_size": args.batch, "warmup_epochs": 0},
           "engine": {"device": str(device), "precision": precision, "log_every": args.log_every,
                      "checkpoint_every": 1000}}
    torch.manual_seed(0)
    trainer = Trainer(resolve(raw), tmp / f"{precision}{compile_}", quiet=True)
    if compile_:
        trainer.training_step = compile_step(trainer.method)
    trainer.method.train()
    trainer.method.on_epoch_start(1, 1000)
    return trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 base width (64 = standard)")
    ap.add_argument("--batch", type=int, default=128, help="images per step (2 views each)")
    ap.add_argument("--pgd-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per configuration per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--compile", action="store_true",
                    help="also rsslctl with engine.compile (minutes to warm up on CPU)")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n = args.batch
    images = torch.randint(0, 256, (n * args.log_every, 3, 32, 32), dtype=torch.uint8)  # one engine epoch
    data = ImageData(images, torch.zeros(len(images), dtype=torch.long), ["x"], "synthetic")
    build_mod.load_split = lambda recipe, split, limit=0: data  # resident synthetic data, no files
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet-18 width "
          f"{args.width}, batch {n} (2 views), PGD-{args.pgd_steps}; load average before: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    batch = images[:n].to(device)
    labels = torch.zeros(n, dtype=torch.long, device=device)
    tmp = Path(tempfile.mkdtemp(prefix="bench_engine_"))

    trainers = {p: make_trainer(args, device, p, tmp) for p in ("fp32", "bf16")}
    ours = {p: trainers[p].method.encoder for p in trainers}
    refs, ref_opts = {}, {}
    for p in ("fp32", "bf16"):
        torch.manual_seed(0)
        refs[p] = ReferenceResNet18(args.width).to(device, memory_format=torch.channels_last)
        ref_opts[p] = torch.optim.SGD(refs[p].parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.rand(2, 3, 32, 32, device=device)
    f_ours, f_ref = forward_flops(ours["fp32"], x, "pgd"), forward_flops(refs["fp32"], x, 1)
    print(f"forward FLOPs per image: rsslctl {f_ours / 2 / 1e6:.2f} M, reference {f_ref / 2 / 1e6:.2f} M")
    if abs(f_ours - f_ref) > 1e-3 * f_ref:
        raise SystemExit("the two models differ in FLOPs; the comparison would not be like for like")
    augment = ViewAugment(32, AugmentOptions(), memory_format=torch.channels_last)

    configs: dict[str, Callable[[], None]] = {}
    for p in ("fp32", "bf16"):
        configs[f"rsslctl {p}"] = (lambda t: lambda: t._step(1, 0, 0, batch, labels))(trainers[p])
        configs[f"reference {p}"] = (lambda m, o, b: lambda: reference_step(m, o, augment, batch, args.pgd_steps, b))(
            refs[p], ref_opts[p], p == "bf16")
    if args.compile:
        compiled = make_trainer(args, device, "bf16", tmp, compile_=True)
        configs["rsslctl bf16 compiled"] = lambda: compiled._step(1, 0, 0, batch, labels)
    print(f"\n1. ACL-DS step: {args.rounds} interleaved rounds × {args.steps} steps per configuration")
    times = interleaved(configs, args.rounds, args.steps, args.warmup, device)
    print("\n| configuration | s/step (median) | images/s |\n|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.3f} | {n / statistics.median(v):.1f} |")
    print("\n| speed-up of rsslctl (reference time / rsslctl time, per round) | median (min–max) |\n|---|---|")
    print(f"| fp32 vs fp32 | {ratio(times, 'reference fp32', 'rsslctl fp32')} |")
    print(f"| bf16 vs bf16 | {ratio(times, 'reference bf16', 'rsslctl bf16')} |")
    print(f"| rsslctl bf16 vs reference fp32 (its published precision) | "
          f"{ratio(times, 'reference fp32', 'rsslctl bf16')} |")
    if args.compile:
        print(f"| rsslctl bf16 compiled vs eager | {ratio(times, 'rsslctl bf16', 'rsslctl bf16 compiled')} |")

    if not args.skip_engine:
        spe = args.log_every
        print(f"\n2. engine overhead (bf16): Trainer._epoch of {spe} steps vs a bare loop of the same steps, "
              f"{args.rounds} interleaved rounds")
        engine = make_trainer(args, device, "bf16", tmp)
        bare = make_trainer(args, device, "bf16", tmp)  # same weights; only its method and optimizer are used
        resident, resident_labels = images.to(device), torch.zeros(len(images), dtype=torch.long, device=device)
        epoch = [0]
        # what Trainer.fit sets up around its epochs: the run clock and a logger (no TensorBoard files here)
        engine._t_run, engine._steps_at_start = time.perf_counter(), 0
        engine.logger = types.SimpleNamespace(progress=lambda *a, **k: None, scalars=lambda *a, **k: None)

        def run_engine() -> None:
            epoch[0] += 1
            engine._epoch(epoch[0], resident, resident_labels, io.StringIO(), lambda k, info=None: None)

        def run_bare() -> None:
            idx = torch.randperm(len(resident))[: spe * n].to(device).view(spe, n)
            losses = []
            for i in range(spe):
                with build_mod.autocast(device, "bf16"):
                    loss, metrics = bare.method.training_step(resident[idx[i]], resident_labels[idx[i]])
                bare.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                bare.optimizer.step()
                losses.append(loss.detach())
            torch.stack(losses).tolist()  # one read-back per epoch

        times = interleaved({"engine": run_engine, "bare loop": run_bare}, args.rounds, 1, 1, device)
        print(f"\n| per epoch of {spe} steps | s (median) |\n|---|---|")
        for k, v in times.items():
            print(f"| {k} | {statistics.median(v):.2f} |")
        rs = [a / b - 1 for a, b in zip(times["engine"], times["bare loop"])]
        print(f"| engine overhead, per round | {100 * statistics.median(rs):+.1f} % "
              f"({100 * min(rs):+.1f} to {100 * max(rs):+.1f} %) |")
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
