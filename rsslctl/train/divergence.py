"""Stopping a run that diverged, before a non-finite loss is logged or non-finite weights reach a checkpoint.

The checks ride on the engine's one device→host copy per ``log_every`` steps: ``finite_weights`` is computed on the
device and copied back with the losses, so a diverging step whose loss was still finite is caught too.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from rsslctl.base.errors import TrainingDiverged
from rsslctl.runtime.checkpoint import latest_checkpoint

ADVICE = "lower optimizer.lr or set engine.grad_clip, then resume with --resume"


def finite_weights(module: nn.Module) -> Tensor:
    """A device flag (no host sync): True when every floating-point tensor of ``module`` is finite."""
    return torch.stack([t.isfinite().all() for t in module.state_dict().values() if t.is_floating_point()]).all()


def _kept(run_dir: Path) -> str:
    last = latest_checkpoint(run_dir)
    return f"the last good checkpoint is kept at {last}" if last else "no checkpoint had been written yet"


def refuse_diverged_weights(weights_ok: float, losses: list[float], epoch: int, step: int, run_dir: Path) -> None:
    """TrainingDiverged when the weights after ``step`` are not finite while every loss read back still is (a
    non-finite loss is reported, as such, by ``refuse_nonfinite_loss``)."""
    if weights_ok != 1.0 and all(math.isfinite(loss) for loss in losses):
        raise TrainingDiverged(f"weights became non-finite by epoch {epoch}, step {step}; {_kept(run_dir)}; {ADVICE}")


def refuse_nonfinite_loss(loss: float, epoch: int, step: int, run_dir: Path) -> None:
    """TrainingDiverged when the loss of ``step`` is NaN or infinite."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"loss became {loss} at epoch {epoch}, step {step}; {_kept(run_dir)}; {ADVICE}")
