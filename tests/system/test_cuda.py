"""The engine on a CUDA GPU: a training run in bf16 with channels_last, the compiled step with CUDA graphs, and the
streamed path's pinned, non-blocking copies. Skipped cleanly without a GPU (``cuda`` marker, see conftest); run them
with ``pytest -m cuda`` or ``python benchmarks/gpu_check.py``."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rsslctl.run.build import load_train_split, open_train_split
from rsslctl.runtime.checkpoint import latest_checkpoint
from rsslctl.train.engine import Trainer
from rsslctl.run.recipe import load
from rsslctl.run.directory import prepare_run_dir
from rsslctl.data.stream import StreamSplit

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
