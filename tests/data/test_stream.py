"""The streamed data path: same batches and views as the resident path, exact resume, per-rank shards, readers in
the real on-disk formats, one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    assert_same_tensors,
    final_checkpoint,
    kill_and_resume,
    same_final_checkpoints,
    sigkill_and_resume,
    train_run,
)
from PIL import Image

import rsslctl.run.build
from rsslctl.base.errors import UserError
from rsslctl.cli import main
from rsslctl.data.augment import AugmentOptions, ViewAugment
from rsslctl.data.dataset import HostSource, ImageData
from rsslctl.data.stream import StreamedImages, StreamSplit, epoch_batches, local_rows
from rsslctl.run.build import load_train_split, open_train_split
from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load
from rsslctl.runtime.checkpoint import latest_checkpoint, load_checkpoint
from rsslctl.train.engine import Trainer
from rsslctl_plugins.datasets import imagenet32

CPU = torch.device("cpu")
RNG = np.random.default_rng(1)


def write_folder(root: Path, n: int = 48, size: int = 20) -> None:
    """``n`` PNG images of ``size`` px (not the recipe's size: every image is resized when read) in 2 classes."""
    for i in range(n):
        folder = root / "imgs" / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def folder_recipe(tiny_recipe: Path, tmp_path: Path, *extra: str):
    write_folder(tmp_path / "data") if not (tmp_path / "data").exists() else None
    return load(tiny_recipe, [f"data.root='{tmp_path / 'data'}'", "data.name='image_folder'", "data.path='imgs'",
                              "data.limit=0", "schedule.batch_size=16", "schedule.epochs=2", *extra])


def test_streamed_batches_and_views_equal_resident_ones(tiny_recipe: Path, tmp_path: Path) -> None:
    recipe = folder_recipe(tiny_recipe, tmp_path, "data.stream='on'", "data.workers=0")
    resident = load_train_split(recipe)
    streamed = open_train_split(recipe, CPU)
    assert isinstance(streamed, StreamSplit) and isinstance(resident, ImageData) and len(streamed) == 48
    rows = torch.randperm(48, generator=torch.Generator().manual_seed(0)).view(3, 16)
    augment = ViewAugment(16, AugmentOptions())
    for idx, (x, y) in zip(rows, streamed.batches(rows, CPU), strict=True):
        assert x.dtype == torch.uint8 and torch.equal(x, resident.images[idx]) and torch.equal(y, resident.labels[idx])
        torch.manual_seed(5)
        a = augment(resident.images[idx])
        torch.manual_seed(5)
        assert torch.equal(augment(x), a)  # identical images and seeds → identical views
    # resizing image by image (workers) gives the pixels of the batched resize (resident)
    host = StreamSplit(HostSource(resident), 12, workers=0)
    assert torch.equal(host.gather(torch.arange(48)), resident.resized(12).images)


def test_workers_resume_position_and_gather(tiny_recipe: Path, tmp_path: Path) -> None:
    recipe = folder_recipe(tiny_recipe, tmp_path, "data.stream='on'", "data.workers=2")
    split = open_train_split(recipe, CPU)
    resident = load_train_split(recipe)
    rows = torch.randperm(48, generator=torch.Generator().manual_seed(1)).view(6, 8)
    full = list(split.batches(rows, CPU))
    tail = list(split.batches(rows, CPU, start=4))  # resumed at step 4 of the epoch
    assert len(full) == 6 and len(tail) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[4:], tail))
    # an epoch left half read (a run stopped inside it), then the next epoch's order through the same workers
    other = torch.randperm(48, generator=torch.Generator().manual_seed(2)).view(6, 8)
    next(iter(split.batches(other, CPU)))
    for idx, (x, y) in zip(other, split.batches(other, CPU), strict=True):
        assert torch.equal(x, resident.images[idx]) and torch.equal(y, resident.labels[idx])
    lazy = StreamedImages(split, CPU)
    idx = torch.tensor([47, 3, 3, 0])
    assert lazy.shape == resident.images.shape and torch.equal(lazy[idx], resident.images[idx])


def test_workers_serve_every_epoch_of_a_run(tmp_path: Path) -> None:
    """The worker processes start once per split, not once per epoch (their warm-up cost every epoch)."""
    import os

    class Pids(HostSource):
        def read(self, i: int) -> torch.Tensor:
            return torch.full((3, 4, 4), os.getpid() % 251, dtype=torch.uint8)

    images = ImageData(torch.zeros((16, 3, 4, 4), dtype=torch.uint8), torch.zeros(16, dtype=torch.long), ["a"], "x")
    split = StreamSplit(Pids(images), 4, workers=2)
    rows = torch.arange(16).view(4, 4)
    seen = [{int(x[0, 0, 0, 0]) for x, _ in split.batches(rows, CPU)} for _ in range(3)]
    assert len(seen[0]) == 2 and seen[0] == seen[1] == seen[2]


@pytest.mark.parametrize("stream", ["on", "off"])
def test_killed_inside_an_epoch_resumes_at_its_position(tiny_recipe: Path, tmp_path: Path, stream: str) -> None:
    """A whole ACL run with a checkpoint every 2 minibatches, killed in the last minibatch of epoch 2 and resumed
    from the checkpoint inside that epoch (same permutation, same position, same RNG), ends bit-identical to an
    uninterrupted resident run without mid-epoch checkpoints; so streamed = resident as well."""
    def recipe(*extra: str):
        return folder_recipe(tiny_recipe, tmp_path, "data.workers=0", *extra)

    def saved_inside_epoch_2(run: Path) -> None:
        assert latest_checkpoint(run).name == "epoch-0001-step-0000002"

    reference = train_run(recipe("data.stream='off'"), tmp_path / "reference")
    assert isinstance(reference.train, ImageData)
    mid = [f"data.stream='{stream}'", "engine.checkpoint_every_steps=2", "engine.keep_checkpoints=10"]
    run = tmp_path / "killed"
    # step 5: epoch 2 = steps 3-5; its checkpoint after minibatch 2 exists, the epoch's end does not
    resumed = kill_and_resume(recipe(*mid), run, 5, reference=tmp_path / "reference",
                              before_resume=saved_inside_epoch_2)
    assert isinstance(resumed.train, StreamSplit) == (stream == "on")
    a, b = final_checkpoint(tmp_path / "reference"), final_checkpoint(run)
    assert latest_checkpoint(run).name == "epoch-0002"
    assert a[2]["metrics"]["loss"] == b[2]["metrics"]["loss"]  # the epoch's mean includes the steps before the kill
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(6))
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]


def test_ranks_read_their_share_of_each_global_batch(tiny_recipe: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = folder_recipe(tiny_recipe, tmp_path, "data.stream='on'", "data.workers=0")
    split, resident = open_train_split(recipe, CPU), load_train_split(recipe)
    rows = torch.arange(48).flip(0).view(3, 16)
    whole = [x for x, _ in epoch_batches(split, None, split.labels, rows, CPU)]
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        streamed = [x for x, _ in epoch_batches(split, None, split.labels, rows, CPU)]
        gathered = [x for x, _ in epoch_batches(resident, resident.images, resident.labels, rows, CPU)]
        assert all(torch.equal(a, b) for a, b in zip(streamed, gathered, strict=True))  # same share on both paths
        shares.append(streamed)
    assert all(x.shape[0] == 8 for share in shares for x in share)
    assert all(torch.equal(torch.cat([a, b]), w) for a, b, w in zip(*shares, whole))
    assert torch.equal(local_rows(rows, 1, 4), rows[:, 4:8])
    with pytest.raises(UserError, match="does not divide by the 3 processes"):
        local_rows(rows, 0, 3)


def test_auto_streams_only_what_exceeds_the_device_budget(tiny_recipe: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = folder_recipe(tiny_recipe, tmp_path, "data.resident_fraction=0.5")  # stream = auto by default
    split_bytes = 48 * 3 * 16 * 16
    monkeypatch.setattr(rsslctl.run.build, "device_memory", lambda device: 2 * split_bytes)
    assert isinstance(open_train_split(recipe, CPU), ImageData)  # exactly at the budget: resident
    monkeypatch.setattr(rsslctl.run.build, "device_memory", lambda device: 2 * split_bytes - 2)
    assert isinstance(open_train_split(recipe, CPU), StreamSplit)
    digits = load(tiny_recipe, ["data.stream='on'"])  # no per-image reader: streamed from host memory
    split = open_train_split(digits, CPU)
    assert isinstance(split, StreamSplit) and isinstance(split.source, HostSource) and len(split) == 96
    digit_bytes = 96 * 3 * 16 * 16  # tiny recipe: 96 digits at 16 px
    monkeypatch.setattr(rsslctl.run.build, "device_memory", lambda device: 2 * digit_bytes)
    assert isinstance(open_train_split(load(tiny_recipe), CPU), ImageData)
    monkeypatch.setattr(rsslctl.run.build, "device_memory", lambda device: 2 * digit_bytes - 2)
    assert isinstance(open_train_split(load(tiny_recipe), CPU).source, HostSource)
    with pytest.raises(UserError, match="data.*stream.*'auto'"):
        load(tiny_recipe, ["data.stream='maybe'"])


def test_imagenet32_npz_is_memory_mapped(tmp_path: Path) -> None:
    folder = tmp_path / "Imagenet32_val_npz"
    folder.mkdir()
    images = RNG.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    np.savez(folder / "val_data.npz", data=images, labels=[3, 1, 1000, 7, 2], mean=np.zeros(3072))
    ds = imagenet32.Imagenet32(None, tmp_path)
    source, data = ds.source("val"), ds.load("val")
    assert type(source).__name__ == "_NpzSource" and torch.equal(source.labels, data.labels)
    split = StreamSplit(source, 32, workers=0)
    assert torch.equal(split.gather(torch.arange(5).flip(0)), data.images.flip(0))
    np.savez_compressed(folder / "val_data.npz", data=images, labels=[3, 1, 1000, 7, 2])
    assert ds.source("val") is None  # compressed: no memory map; streamed from host memory instead


def test_missing_streamed_files_are_one_line(tiny_recipe: Path, tmp_path: Path) -> None:
    recipe = folder_recipe(tiny_recipe, tmp_path, "data.stream='on'", "data.workers=2")
    split = open_train_split(recipe, CPU)
    gone = next((tmp_path / "data" / "imgs" / "train" / "class1").glob("*.png"))
    gone.unlink()  # removed after the split was listed: a worker meets it
    with pytest.raises(UserError) as err:
        list(split.batches(torch.arange(48).view(3, 16), CPU))
    assert gone.name in str(err.value) and "\n" not in str(err.value)
    result = CliRunner().invoke(main, ["pretrain", str(tiny_recipe), "--quiet", "--set", "data.name='image_folder'",
                                       "--set", f"data.root='{tmp_path / 'nowhere'}'", "--set", "data.stream='on'"])
    err_line = result.stderr.strip()
    assert result.exit_code == 2 and err_line.startswith("error: image_folder: data files not found")
    assert "\n" not in err_line and "Traceback" not in result.output


def test_coreset_selection_reads_the_streamed_split(tiny_recipe: Path, tmp_path: Path) -> None:
    """RCS indexes its pool through ``StreamedImages``: a streamed run selects and trains exactly as a resident one."""
    coreset = ["coreset.name='rcs'", "coreset.fraction=0.4", "coreset.warmup_epochs=1", "schedule.epochs=2"]
    out = {}
    for stream in ("off", "on"):
        recipe = load(tiny_recipe, coreset + [f"data.stream='{stream}'", "data.workers=0"])
        run = tmp_path / stream
        prepare_run_dir(recipe, run, force=False)
        trainer = Trainer(recipe, run, quiet=True)
        assert isinstance(trainer.train, StreamSplit) == (stream == "on")
        trainer.fit()
        out[stream] = load_checkpoint(latest_checkpoint(run))
    (a, state_a, _), (b, state_b, _) = out["off"], out["on"]
    assert torch.equal(state_a["coreset.indices"], state_b["coreset.indices"])
    assert_same_tensors(a, b)


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (forked DataLoader workers keep their parent's command line)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow  # two CLI runs with worker processes: ~40 s on the 2-core CI machine
def test_sigkilled_streamed_run_leaves_no_workers_and_resumes_exactly(tiny_recipe: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    write_folder(tmp_path / "data")
    sets = [f"data.root='{tmp_path / 'data'}'", "data.name='image_folder'", "data.path='imgs'", "data.limit=0",
            "schedule.batch_size=16", "schedule.epochs=2", "engine.checkpoint_every_steps=1",
            "engine.keep_checkpoints=20", "data.workers=2"]
    args = lambda stream: [str(tiny_recipe)] + [a for s in sets + [f"data.stream='{stream}'"]  # noqa: E731
                                                for a in ("--set", s)]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run([sys.executable, "-m", "rsslctl.cli", "pretrain", *args("off"), "--run-dir", str(full), "--quiet"],
                   check=True)

    def no_workers_left(run: Path) -> None:
        deadline = time.time() + 30  # orphaned workers notice their parent is gone (DataLoader's watchdog) and exit
        while _processes_mentioning(str(run)) and time.time() < deadline:
            time.sleep(0.5)
        assert not _processes_mentioning(str(run)), "DataLoader workers outlived the killed run"

    sigkill_and_resume(args("on"), killed, before_resume=no_workers_left)
    assert latest_checkpoint(killed).name == "epoch-0002"
    same_final_checkpoints(full, killed)
