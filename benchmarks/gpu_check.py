"""GPU check: CUDA-marked tests, an ACL ResNet-18 epoch in four settings, decode rates, a torchrun DDP run; one JSON.

  python benchmarks/gpu_check.py                      # on a machine with CUDA (about 5-10 min on one H100/H200)
  python benchmarks/gpu_check.py --cpu-smoke          # the whole flow, tiny, on the CPU (under a minute)

Everything runs through the command a user runs, ``rsslctl pretrain acl`` (the shipped ACL recipe: CIFAR ResNet-18,
dual BN, 5-step contrastive PGD, LARS), in a fresh process per configuration, on synthetic CIFAR-10 written to a
temporary folder in the real on-disk format (50,000 random 32×32 uint8 images: timing needs the shapes, not the
pictures). Settings compared, each with ``schedule.batch_size = 512``:

  fp32                        engine.precision = fp32, channels_last off
  bf16                        engine.precision = bf16 (autocast), channels_last off
  bf16+channels_last          + engine.channels_last
  bf16+channels_last+compile  + engine.compile (torch.compile of the training step)

Each runs ``--epochs`` epochs (default 2); the first includes warm-up (cuDNN autotuning, compilation) and is reported
apart, the figure is the median of the later ones, read from the run's metrics.jsonl (the engine's own epoch clock,
which ends with a read-back of the last step, so all device work is inside it). The target is <= 8 s per epoch on
one H100/H200-class GPU.

Decode: ``benchmarks/bench_decode.py --device cuda`` (torchvision ImageFolder against the streamed path with CPU
workers and with nvJPEG), its ratio lines in ``decode``.

DDP: ``torchrun --standalone --nproc_per_node=N --no-python rsslctl pretrain acl ...`` over all N visible GPUs
(global batch 512), bf16+channels_last. It needs the torch.distributed engine (``rsslctl.runtime.distributed``); without
it, or when the launch fails, the JSON says ``"skipped": "<why>"``.

Without CUDA (and without ``--cpu-smoke``) the script prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 8.0
CONFIGS = {  # name → engine overrides
    "fp32": ["engine.precision='fp32'", "engine.channels_last=false"],
    "bf16": ["engine.precision='bf16'", "engine.channels_last=false"],
    "bf16+channels_last": ["engine.precision='bf16'", "engine.channels_last=true"],
    "bf16+channels_last+compile": ["engine.precision='bf16'", "engine.channels_last=true", "engine.compile=true"],
}
DDP_CONFIG = "bf16+channels_last"


def write_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random images in the CIFAR-10 python release layout (5 train batches, test batch, meta), as the loader reads."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    sizes = [n_train // 5 + (i < n_train % 5) for i in range(5)]
    for name, n in [(f"data_batch_{i + 1}", s) for i, s in enumerate(sizes)] + [("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh, protocol=2)


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                           "platform": platform.platform()}
    for pkg in ("rsslctl", "timm", "kornia", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def cuda_test_files(tests: Path) -> list[str]:
    """Test files anywhere under ``tests`` (they mirror the package in sub-folders) that carry the cuda marker."""
    return sorted(str(f) for f in tests.rglob("test_*.py") if "mark.cuda" in f.read_text(errors="replace"))


def run_cuda_tests(timeout: float) -> dict[str, Any]:
    """``pytest -m cuda`` over the test files that carry the marker."""
    tests = ROOT / "tests"
    if not tests.is_dir():
        return {"skipped": f"no tests folder at {tests} (run from a source checkout)"}
    files = cuda_test_files(tests)
    if not files:
        return {"skipped": "no test file carries the cuda marker"}
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rs",
           *files]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd), "error": f"timed out after {timeout:.0f} s"}
    summary = next((line for line in reversed(proc.stdout.splitlines())
                    if re.search(r"\d+ (passed|failed|skipped|error)", line)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    return {"command": "pytest -m cuda " + " ".join(Path(f).name for f in files), "exit_code": proc.returncode,
            "summary": summary.strip("= "), "counts": counts, "seconds": round(time.perf_counter() - t0, 1),
            **({"output_tail": proc.stdout[-3000:] + proc.stderr[-2000:]} if proc.returncode not in (0, 5) else {})}


def decode_benchmark(smoke: bool, timeout: float) -> dict[str, Any]:
    """``benchmarks/bench_decode.py``: the ratios of the streamed path (CPU workers and, on CUDA, nvJPEG) to
    torchvision's ImageFolder, which decide ``data.decode_on_device``'s default."""
    args = ["--images", "32", "--batch", "16", "--rounds", "1", "--sizes", "64"] if smoke else [
        "--images", "512", "--rounds", "3", "--device", "cuda"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode:
        return {"command": " ".join(cmd[1:]), "error": last_line(proc.stderr) or f"exit code {proc.returncode}"}
    lines = proc.stdout.splitlines()
    return {"command": " ".join(cmd[1:]), "ratios": [line for line in lines if "/ torchvision" in line],
            "pixels": [line.strip() for line in lines if "max |pixel" in line],
            "load_average": [line for line in lines if line.startswith("load average")]}


def rsslctl_command() -> list[str]:
    """The installed ``rsslctl`` executable (torchrun --no-python needs one), else ``python -m rsslctl.cli``."""
    exe = Path(sys.executable).with_name("rsslctl")
    found = str(exe) if exe.is_file() else shutil.which("rsslctl")
    return [found] if found else [sys.executable, "-m", "rsslctl.cli"]


def epoch_figures(run_dir: Path) -> dict[str, Any]:
    """Per-epoch seconds and images/s from metrics.jsonl; the first epoch (warm-up, compilation) kept apart."""
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if line.strip() and json.loads(line).get("kind") == "epoch"]
    if not epochs:
        raise RuntimeError(f"{run_dir}: no epoch record in metrics.jsonl")
    later = epochs[1:] or epochs
    seconds = statistics.median(e["seconds"] for e in later)
    return {"first_epoch_s": round(epochs[0]["seconds"], 3), "epoch_s": round(seconds, 3),
            "epoch_s_all": [round(e["seconds"], 3) for e in epochs],
            "images_per_s": round(statistics.median(e["images_per_s"] for e in later), 1),
            "last_loss": epochs[-1]["loss"]}


def pretrain(prefix: list[str], run_dir: Path, sets: list[str], timeout: float, in_process: bool = False
             ) -> dict[str, Any]:
    """One ``rsslctl pretrain acl`` run (under ``prefix``, e.g. torchrun); its epoch figures or why it failed.
    Each runs in a fresh process, except ``in_process`` ones (the CPU smoke run: the same command through the CLI's
    entry point, without paying torch's import time again)."""
    args = ["pretrain", "acl", "--run-dir", str(run_dir), "--quiet"] + [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    if in_process:
        from click.testing import CliRunner

        from rsslctl.cli import main as cli
        result = CliRunner().invoke(cli, args)
        code, err = result.exit_code, f"{result.output}\n{result.exception or ''}"
    else:
        try:
            proc = subprocess.run(prefix + rsslctl_command() + args, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        code, err = proc.returncode, proc.stderr or proc.stdout
    wall = round(time.perf_counter() - t0, 1)
    if code != 0:
        return {"error": f"exit code {code}: {last_line(err)}", "wall_s": wall}
    out = {"wall_s": wall, **epoch_figures(run_dir)}
    ckpts = sorted(p for p in run_dir.glob("epoch-*") if (p / "meta.json").is_file())
    if ckpts:
        meta = json.loads((ckpts[-1] / "meta.json").read_text())
        out.update(device=meta.get("device"), bf16=meta.get("bf16"), world_size=meta.get("world_size"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU version of the whole flow (no CUDA needed)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default gpu_check-<host>-<time>.json here)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per configuration (the first is warm-up)")
    p.add_argument("--images", type=int, default=50_000, help="synthetic training images")
    p.add_argument("--batch", type=int, default=512, help="global batch size")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-ddp", action="store_true")
    p.add_argument("--skip-decode", action="store_true", help="skip benchmarks/bench_decode.py")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed to each run")
    a = p.parse_args(argv)
    if not a.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with a GPU, "
              "or pass --cpu-smoke for a tiny CPU run of the whole flow", file=sys.stderr)
        return 2
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"gpu_check: unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}",
              file=sys.stderr)
        return 2
    smoke = a.cpu_smoke
    device = "cpu" if smoke else "cuda"
    images, batch = (192, 64) if smoke else (a.images, a.batch)
    n_gpus = 2 if smoke else torch.cuda.device_count()
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu_smoke": smoke,
        "device": "cpu (smoke)" if smoke else torch.cuda.get_device_name(0), "visible_gpus": 0 if smoke else n_gpus,
        "versions": versions(), "target_epoch_s": TARGET_S,
        "settings": {"recipe": "acl (shipped)", "images": images, "image_size": 16 if smoke else 32,
                     "batch_size": batch, "attack_steps": 1 if smoke else 5, "epochs": a.epochs},
    }
    base = [f"engine.device='{device}'", f"schedule.epochs={a.epochs}", f"schedule.batch_size={batch}",
            "schedule.warmup_epochs=0", "engine.checkpoint_every=1000", "logging.tensorboard=false",
            "logging.csv=false", "data.stream='off'"]
    if smoke:  # a narrow network at 16 px, 1 PGD step: the flow, not the figures
        base += ["data.image_size=16", "backbone.model_kwargs={channels=[8, 16, 16, 16]}", "encoder.head_dim=32",
                 "attack.steps=1", "engine.threads=1"]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        tmp_path = Path(tmp)
        write_cifar10(tmp_path / "data", images, 1000 if not smoke else 100)
        base.append(f"data.root='{tmp_path / 'data'}'")
        report["cuda_tests"] = {"skipped": "--skip-tests"} if a.skip_tests else run_cuda_tests(a.timeout)
        print(f"cuda tests: {report['cuda_tests'].get('summary') or report['cuda_tests']}", flush=True)
        report["acl_epoch"] = {}
        for name in configs:
            if smoke and "compile" in name:
                report["acl_epoch"][name] = {"skipped": "--cpu-smoke does not compile (inductor code generation "
                                                        "takes minutes on a small CPU)"}
                continue
            result = pretrain([], tmp_path / "runs" / name.replace("+", "_"), base + CONFIGS[name], a.timeout,
                              in_process=smoke)
            if "epoch_s" in result and not smoke:
                result["meets_target"] = result["epoch_s"] <= TARGET_S
            report["acl_epoch"][name] = result
            print(f"{name}: {result.get('epoch_s', result.get('error'))} s/epoch", flush=True)
        report["decode"] = {"skipped": "--skip-decode"} if a.skip_decode else decode_benchmark(smoke, a.timeout)
        dec = report["decode"]
        print(f"decode: {dec.get('ratios', dec.get('skipped', dec.get('error')))}", flush=True)
        report["ddp"] = {"skipped": "--skip-ddp"} if a.skip_ddp else ddp(tmp_path, base, n_gpus, smoke, a.timeout,
                                                                        report["acl_epoch"].get(DDP_CONFIG, {}))
        print(f"ddp: {report['ddp'].get('epoch_s', report['ddp'].get('skipped', report['ddp'].get('error')))}",
              flush=True)
    out = a.out or Path(f"gpu_check-{platform.node()}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    failed = report["cuda_tests"].get("exit_code") not in (None, 0, 5) or any(
        "error" in r for r in report["acl_epoch"].values())
    return 1 if failed else 0


def ddp(tmp_path: Path, base: list[str], n: int, smoke: bool, timeout: float, single: dict[str, Any]) -> dict[str, Any]:
    """The DDP row: torchrun over ``n`` processes (GPUs), or ``skipped`` with the reason."""
    if importlib.util.find_spec("rsslctl.runtime.distributed") is None:
        return {"skipped": "rsslctl.runtime.distributed is not in this build (the torch.distributed engine is not "
                           "merged)"}
    if n < 1:
        return {"skipped": "no visible GPU"}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "--no-python"]
    run_dir = tmp_path / "runs" / "ddp"
    result = pretrain(prefix, run_dir, base + CONFIGS[DDP_CONFIG], timeout)
    result = {"processes": n, "config": DDP_CONFIG, "command": "torchrun --standalone --nproc_per_node="
              f"{n} --no-python rsslctl pretrain acl ...", **result}
    if "error" in result:
        return {**result, "skipped": f"torchrun run failed: {result.pop('error')}"}
    if result.get("world_size") != n:
        return {**result, "skipped": f"ran, but the checkpoint reports world_size = {result.get('world_size')}, "
                                     f"not {n}: the runs were not one DDP job"}
    if single.get("epoch_s") and not smoke:
        result["speedup_vs_one_gpu"] = round(single["epoch_s"] / result["epoch_s"], 2)
        result["scaling_efficiency"] = round(result["speedup_vs_one_gpu"] / n, 3)
    return result


if __name__ == "__main__":
    sys.exit(main())
