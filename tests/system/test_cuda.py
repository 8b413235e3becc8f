"""The engine on a CUDA GPU: a training run in bf16 with channels_last, the compiled step with CUDA graphs, and the
streamed path's pinned, non-blocking copies. Skipped cleanly without a GPU (``cuda`` marker, see conftest); run them
with ``pytest -m cuda`` or ``python benchmarks/gpu_check.py``."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rsslctl.data.stream import StreamSplit
from rsslctl.run.build import load_train_split, open_train_split
from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load
from rsslctl.runtime.checkpoint import latest_checkpoint
from rsslctl.train.engine import Trainer

pytestmark = pytest.mark.cuda
CUDA = ["engine.device='cuda'", "engine.precision='bf16'", "engine.channels_last=true"]


def _fit(tiny_recipe: Path, run: Path, extra: list[str]) -> dict:
    recipe = load(tiny_recipe, CUDA + ["schedule.epochs=2"] + extra)
    prepare_run_dir(recipe, run, force=False)
    summary = Trainer(recipe, run, quiet=True).fit()
    meta = json.loads((latest_checkpoint(run) / "meta.json").read_text())
    assert meta["device"].startswith("cuda") and meta["bf16"] is True
    return summary


def test_training_runs_on_cuda(tiny_recipe: Path, tmp_path: Path) -> None:
    summary = _fit(tiny_recipe, tmp_path / "run", [])
    assert math.isfinite(summary["loss"]) and summary["images_per_s"] > 0


def test_compiled_step_with_cuda_graphs(tiny_recipe: Path, tmp_path: Path) -> None:
    summary = _fit(tiny_recipe, tmp_path / "run", ["engine.compile=true", "engine.cuda_graphs=true"])
    assert math.isfinite(summary["loss"])


def test_streamed_batches_reach_the_gpu_unchanged(tiny_recipe: Path, tmp_path: Path) -> None:
    recipe = load(tiny_recipe, CUDA + ["data.stream='on'", "data.workers=2"])
    device = torch.device("cuda")
    split, resident = open_train_split(recipe, device), load_train_split(recipe)
    assert isinstance(split, StreamSplit)
    rows = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:64].view(2, 32)
    for idx, (x, y) in zip(rows, split.batches(rows, device), strict=True):
        assert x.device.type == "cuda" and torch.equal(x.cpu(), resident.images[idx])
        assert torch.equal(y.cpu(), resident.labels[idx])
    summary = _fit(tiny_recipe, tmp_path / "streamed", ["data.stream='on'", "data.workers=2"])
    assert math.isfinite(summary["loss"])


def test_nvjpeg_batches_are_close_to_the_cpu_decode(tmp_path: Path) -> None:
    """data.decode_on_device: the JPEGs of a minibatch decoded together by nvJPEG (a PNG among them by the workers)
    give the CPU decoder's pixels up to the decoders' rounding; a corrupt JPEG is one line naming it."""
    import numpy as np
    from PIL import Image

    from rsslctl.base.errors import UserError
    from rsslctl_plugins.datasets.image_folder import ImageFolder, ImageFolderOptions

    rng = np.random.default_rng(0)
    for i in range(12):
        folder = tmp_path / "imgs" / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((40, 30))
        small.save(folder / (f"{i:02d}.png" if i == 5 else f"{i:02d}.jpg"), quality=90)
    ds = ImageFolder(ImageFolderOptions(path="imgs", image_size=24), tmp_path)
    resident, device = ds.load("train"), torch.device("cuda")
    split = StreamSplit(ds.source("train"), 16, workers=2, decode_on_device=True)
    rows = torch.arange(12).flip(0).view(2, 6)
    for idx, (x, y) in zip(rows, split.batches(rows, device), strict=True):
        diff = (x.cpu().int() - resident.resized(16).images[idx].int()).abs()
        assert x.device.type == "cuda" and x.dtype == torch.uint8 and int(diff.max()) <= 12, int(diff.max())
        assert torch.equal(y.cpu(), resident.labels[idx])
    bad = tmp_path / "imgs" / "train" / "c0" / "00.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(UserError, match="00.jpg: cannot read image"):
        list(split.batches(rows, device))
