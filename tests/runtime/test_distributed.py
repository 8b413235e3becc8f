"""Multi-process training on torch.distributed (gloo, CPU): two ranks at global batch 2B equal one process at 2B,
a SIGKILLed two-process run resumes bit-identically, coreset selection sharded over two ranks picks what one picks,
SLF fine-tuning on two ranks trains the head one process trains, and bad input stops every rank with one line. Each test
launches real processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so they take a few
seconds each."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import assert_same_tensors
from safetensors.torch import load_file

from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load
from rsslctl.runtime import distributed as dist
from rsslctl.runtime.checkpoint import latest_checkpoint, read_meta
from rsslctl.train.engine import Trainer

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
EXACT = ["engine.threads=1", "engine.precision='fp32'", "engine.channels_last=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Run ``args`` as ``world`` ranks (torchrun's environment, gloo on the CPU); every rank's result."""
    port = free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def worker() -> ModuleType:
    """ddp_worker.py as a module, for the single-process references run in the test's own process."""
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rsslctl.cli", *args]


def test_not_launched_means_one_process() -> None:
    assert not dist.active() and dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    x = torch.randn(4, 3, requires_grad=True)
    assert dist.gather_with_grad(x) is x and dist.input_grad_scale() == 1.0
    with dist.data_parallel_step():
        assert dist.gather_with_grad(x) is x and not dist.collective()
    assert dist.local_batch(32) == 32 and dist.shard(x) is not None and torch.equal(dist.shard(x), x)


def test_two_ranks_equal_one_process_on_fixed_views(tiny_recipe: Path, tmp_path: Path) -> None:
    """Same loss, same adversarial examples, same weights (and BN statistics) after one step: ACL (dual BN, PGD on
    the global NT-Xent, global negatives) at global batch 32, sync_bn on. The views are fixed (augmentation replaced)
    and PGD starts at the views (no random start), since each rank draws its own random numbers."""
    sets = [*EXACT, "engine.sync_bn=true", "attack.random_start=false", "attack.steps=2", "engine.log_every=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    worker().step(str(tiny_recipe), str(one), sets)  # the single-process reference, in this process
    runs = launch([sys.executable, WORKER, "step", str(tiny_recipe), str(two), *sets], 2)
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    a = torch.load(one / "rank0.pt")
    b0, b1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    assert abs(float(a["loss"]) - float(b0["loss"])) < 1e-5 and float(b0["loss"]) == float(b1["loss"])
    adv = torch.cat([b0["adv"], b1["adv"]])
    assert adv.shape == a["adv"].shape
    assert len(a["grads"]) == len(b0["grads"]) == 2  # PGD steps: the gradient of the global loss, rank by rank
    for g, g0, g1 in zip(a["grads"], b0["grads"], b1["grads"]):
        torch.testing.assert_close(torch.cat([g0, g1]), g, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(adv, a["adv"], atol=1e-5, rtol=0)
    assert (adv - a["adv"]).abs().max() < 1e-5  # not one pixel's sign flipped
    for k, v in a["state"].items():
        if v.is_floating_point():
            torch.testing.assert_close(b0["state"][k], v, atol=1e-5, rtol=1e-5, msg=k)
            assert torch.equal(b0["state"][k], b1["state"][k]), f"{k} differs between the ranks"
        else:
            assert torch.equal(b0["state"][k], v), k


def test_two_ranks_killed_and_resumed_end_bit_identical(tiny_recipe: Path, tmp_path: Path) -> None:
    """Two ranks, gloo: one run uninterrupted; one SIGKILLed (both ranks) mid-epoch 2 after epoch 1's checkpoint, then
    resumed with `rsslctl pretrain --resume` on two ranks. Same weights, optimizer state and per-rank RNG states."""
    sets = [*EXACT, "engine.sync_bn=true"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    runs = launch(cli("pretrain", str(tiny_recipe), "--run-dir", str(full), "--quiet",
                      *[x for s in sets for x in ("--set", s)]), 2)
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    runs = launch([sys.executable, WORKER, "train", str(tiny_recipe), str(killed), "4", *sets], 2)
    assert [r.returncode for r in runs] == [-9, -9], runs[0].stderr[-2000:]
    assert latest_checkpoint(killed).name == "epoch-0001"
    one = subprocess.run(cli("pretrain", "--resume", str(killed), "--quiet"), capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert one.returncode == 2 and "written by a run of 2 process(es), resumed with 1" in one.stderr, one.stderr
    runs = launch(cli("pretrain", "--resume", str(killed), "--quiet"), 2)
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    a, b = latest_checkpoint(full), latest_checkpoint(killed)
    assert a.name == b.name == "epoch-0003" and read_meta(b)["world_size"] == 2
    for name in ("model.safetensors", "state.safetensors"):
        assert_same_tensors(load_file(a / name), load_file(b / name), name)
    assert "rank1.rng.cpu" in load_file(b / "state.safetensors")
    assert records(full) == records(killed)  # every step's loss and metrics, every epoch's mean loss
    # end to end against one process at the same global batch: the views differ (each rank draws its own), but the
    # schedule — steps per epoch, learning rate of every step — is the global batch's
    alone = tmp_path / "alone"
    recipe = load(tiny_recipe, sets)
    trainer = Trainer(recipe, alone, quiet=True)
    prepare_run_dir(recipe, alone, False)
    trainer.fit()
    keys = ("kind", "epoch", "step", "lr")
    assert [{k: r.get(k) for k in keys} for r in records(alone)] == [{k: r.get(k) for k in keys} for r in records(full)]
    assert ("world_size" in read_meta(latest_checkpoint(alone))
            and read_meta(latest_checkpoint(alone))["world_size"] == 1)


def records(run: Path) -> list[dict]:
    """metrics.jsonl without its timings."""
    out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in out]


def test_bad_global_batch_stops_every_rank_with_one_line(tiny_recipe: Path, tmp_path: Path) -> None:
    runs = launch(cli("pretrain", str(tiny_recipe), "--run-dir", str(tmp_path / "r"), "--quiet", "--set",
                      "schedule.batch_size=31"), 2)
    assert [r.returncode for r in runs] == [2, 2]
    lines = runs[0].stderr.strip().splitlines()
    assert len(lines) == 1 and "schedule.batch_size = 31" in lines[0] and "multiple of 2" in lines[0], lines
    assert runs[1].stderr.strip() == "" and runs[1].stdout.strip() == ""


def test_nccl_without_cuda_is_one_line(tiny_recipe: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    runs = launch(cli("pretrain", str(tiny_recipe), "--run-dir", str(tmp_path / "r"), "--quiet", "--set",
                      "engine.backend='nccl'"), 2)
    assert [r.returncode for r in runs] == [2, 2]
    assert "engine.backend = \"nccl\" needs CUDA" in runs[0].stderr and runs[1].stderr.strip() == ""


def test_rcs_on_two_ranks_selects_what_one_selects(tiny_recipe: Path, tmp_path: Path) -> None:
    sets = [*EXACT, "coreset.name='rcs'", "coreset.fraction=0.4", "coreset.warmup_epochs=1", "coreset.unit=16"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    worker().coreset(str(tiny_recipe), str(one), sets)
    runs = launch([sys.executable, WORKER, "coreset", str(tiny_recipe), str(two), *sets], 2)
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    assert torch.equal(torch.load(one / "picked.pt"), torch.load(two / "picked.pt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_cuda_sync_bn_is_torch_syncbatchnorm() -> None:
    from rsslctl.nn.encoder import DualBatchNorm
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), DualBatchNorm(torch.nn.BatchNorm2d(4)))
    dist.convert_sync_bn(m, torch.device("cuda"))
    assert all(isinstance(bn, torch.nn.SyncBatchNorm) for bn in m[1].bn_list)


def test_finetune_slf_on_two_ranks_equals_one_process(tiny_recipe: Path, tmp_path: Path) -> None:
    """SLF (frozen encoder in eval mode, linear head, crop/flip drawn for the whole minibatch on every rank): two ranks
    train the same head as one process, and only rank 0 writes. Batch 30 over 96 images leaves a last minibatch of 6,
    split 3 + 3 and weighted by each rank's share."""
    run = tmp_path / "run"
    recipe = load(tiny_recipe, [*EXACT, "schedule.epochs=1"])
    trainer = Trainer(recipe, run, quiet=True)
    prepare_run_dir(recipe, run, False)
    trainer.fit()
    args = ["finetune", str(run), "--mode", "SLF", "--epochs", "2", "--batch-size", "30", "--no-evaluate", "--quiet"]
    one = subprocess.run(cli(*args, "--out", str(tmp_path / "one")), capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-2000:]
    runs = launch(cli(*args, "--out", str(tmp_path / "two")), 2)
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    a, b = (load_file(tmp_path / d / "finetune" / "SLF" / "model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
    ra, rb = (records(tmp_path / d / "finetune" / "SLF") for d in ("one", "two"))
    assert [r["train_accuracy"] for r in ra] == [r["train_accuracy"] for r in rb]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 * max(1.0, abs(x["loss"])) for x, y in zip(ra, rb))  # fp32 sums


def test_every_global_contrastive_loss_equals_one_process(tmp_path: Path) -> None:
    """NT-Xent, HCL and IFM see the global batch's negatives: on two ranks, the mean of the ranks' losses and each
    rank's gradient (as the engine averages it) equal one process's loss and gradient rows on the whole batch. The
    negative queue and the learnable bank stay identical on every rank."""
    alone = tmp_path / "one"
    alone.mkdir()
    worker().losses(str(alone))
    runs = launch([sys.executable, WORKER, "losses", str(tmp_path)], 2)
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    one = torch.load(alone / "losses0.pt")
    r0, r1 = torch.load(tmp_path / "losses0.pt"), torch.load(tmp_path / "losses1.pt")
    ptr, keys = one.pop("queue")
    for r in (r0, r1):  # every rank enqueued the whole global batch, in rank order, as one process does
        assert torch.equal(r["queue"][0], ptr) and torch.equal(r["queue"][1], keys)
    one.pop("bank_direction")
    mean = (torch.randn(12, 8, generator=torch.Generator().manual_seed(2))
            + torch.randn(12, 8, generator=torch.Generator().manual_seed(3))) / 2
    for r in (r0, r1):  # the bank moves along the mean of the ranks' directions
        torch.testing.assert_close(r["bank_direction"], mean)
    for name, (loss, grad) in one.items():
        torch.testing.assert_close(r0[name][0], loss, atol=1e-6, rtol=1e-6, msg=name)
        torch.testing.assert_close(torch.cat([r0[name][1], r1[name][1]]), grad, atol=1e-7, rtol=1e-5, msg=name)
