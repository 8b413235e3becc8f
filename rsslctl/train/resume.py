"""Resuming a run: the checkpoint to continue from, everything restored from it, and the logs cut back to it.

A resumed run continues bit for bit as the uninterrupted one would (weights, optimizer, every rank's random streams,
the method's run state, the coreset in use, the position inside an epoch), and its metrics log keeps only the
records of the steps that checkpoint covers.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from rsslctl.base.console import console, err_console
from rsslctl.base.errors import UserError
from rsslctl.method.base import Method
from rsslctl.run.build import load_weights
from rsslctl.run.logs import filter_jsonl
from rsslctl.runtime import distributed as dist
from rsslctl.runtime.checkpoint import (
    CorruptCheckpoint,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    load_checkpoint_optimizer,
    own_state,
    refuse_nonfinite,
    set_rng_state,
)


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a checkpoint leaves a run: after ``epoch`` and ``within`` minibatches of the next one, whose losses so
    far sum to ``partial[0]`` over ``partial[1]`` steps."""

    epoch: int = 0
    within: int = 0
    partial: tuple[float, int] = (0.0, 0)


def pick_checkpoint(run_dir: Path, chosen: Path | None) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or ``chosen`` if it is one of them (else one line)."""
    if chosen is None:
        return latest_checkpoint(run_dir)
    known = {c.resolve(): c for c in checkpoints(run_dir)}
    if Path(chosen).resolve() not in known:
        names = ", ".join(c.name for c in known.values()) or "none"
        raise UserError(f"--from-checkpoint {chosen}: not a complete checkpoint of {run_dir} "
                        f"(its checkpoints: {names})")
    return known[Path(chosen).resolve()]


def restore(run_dir: Path, chosen: Path | None, method: Method, optimizer: torch.optim.Optimizer, coreset: Any,
            device: torch.device) -> Position | None:
    """Load the checkpoint ``pick_checkpoint`` names into ``method``, ``optimizer``, the random streams and
    ``coreset``; None if there is none. A corrupt one is named with the command that resumes from the previous
    good one; nothing is deleted."""
    ckpt = pick_checkpoint(run_dir, chosen)
    if ckpt is None:
        return None
    try:
        model, state, meta = load_checkpoint(ckpt)
        refuse_nonfinite(model, str(ckpt))
    except CorruptCheckpoint as exc:
        older = [c for c in checkpoints(run_dir) if c.name < ckpt.name]
        hint = (f"resume from the previous one with `rsslctl pretrain --resume {run_dir} --from-checkpoint "
                f"{older[-1]}`" if older else "no older checkpoint is left; start over with --force")
        raise UserError(f"{exc}; {hint} (nothing was deleted)") from None
    load_weights(method, model, ckpt)
    try:
        load_checkpoint_optimizer(optimizer, state, meta)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"{ckpt}: optimizer state does not match the recipe ({str(exc)[:120]})") from None
    saved_world = int(meta.get("world_size", 1))
    if saved_world != dist.world_size():
        raise UserError(f"{ckpt}: written by a run of {saved_world} process(es), resumed with "
                        f"{dist.world_size()}; resume with the same number (torchrun --nproc_per_node and "
                        "--nnodes), since each rank's random streams and share of the batch are part of the state")
    state = own_state(state)  # ranks > 0 keep their RNG and run state under rank<r>.
    set_rng_state(state)
    epoch, within = int(meta["epoch"]), int(meta.get("position", 0))
    partial = (float(meta["metrics"]["loss_sum"]), int(meta["metrics"]["loss_count"])) if within else (0.0, 0)
    method.load_run_state({k[len("method."):]: v.to(device) for k, v in state.items() if k.startswith("method.")})
    if coreset and "coreset.indices" in state:
        coreset.indices = state["coreset.indices"]
    return Position(epoch, within, partial)


def truncate_metrics(path: Path, first_lost_step: int, epoch: int) -> None:
    """Drop the records a killed run wrote after the checkpoint resumed from (steps from ``first_lost_step`` on,
    epochs after ``epoch``), so the log matches the weights; streamed, see ``filter_jsonl``."""
    def keep(rec: dict[str, Any]) -> bool:
        step, done = rec.get("step", -1), rec.get("epoch", 0)
        if not (isinstance(step, (int, float)) and isinstance(done, (int, float))):
            return False  # not a record this run wrote
        return step < first_lost_step and (rec.get("kind") == "step" or done <= epoch)
    filter_jsonl(path, keep)


def announce(run_dir: Path, at: Position | None, epochs: int, quiet: bool) -> bool:
    """Say what a resume found; True when the run had already finished (nothing left to train)."""
    if at is None:
        err_console.print(f"{run_dir}: no checkpoint yet, so nothing to resume from; training from epoch 1",
                          highlight=False)
    elif at.epoch >= epochs:
        err_console.print(f"{run_dir}: already finished all {epochs} epochs; nothing to do (to train longer, start a "
                          "new run)", highlight=False)
        return True
    elif not quiet:
        console.print(f"resuming after epoch {at.epoch}"
                      + (f", minibatch {at.within} of epoch {at.epoch + 1}" if at.within else ""))
    return False
