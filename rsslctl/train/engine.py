"""The one training engine every method runs on.

Whole training split resident on the device as uint8 (or streamed: ``stream``); batched on-device augmentation inside
the method; bf16 autocast, channels_last, a compiled training step and CUDA graphs as options; per-iteration LR
schedule; metrics read back from the device every ``log_every`` steps only (no host sync per step, see
tests/train/test_sync.py);
atomic checkpoints and exact resume (model, optimizer, RNG states, step counter).

Under torchrun (``rsslctl.runtime.distributed``) every rank holds the split, takes its contiguous share of each global
minibatch (``schedule.batch_size`` is the global batch), averages gradients with the other ranks after each
backward, and rank 0 alone logs and writes checkpoints (with every rank's RNG and run state).

``Trainer.fit`` reads top to bottom (resume, epochs, steps, end of epoch, finish); the pieces it calls live beside it:
``step`` (one optimizer step, shared with ``classify.train_classifier``), ``resume``, ``progress`` and ``divergence``.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import torch
from torch import Tensor

from rsslctl.base.console import console, err_console
from rsslctl.data.stream import epoch_batches, on_device
from rsslctl.nn.optim import LRSchedule, StepClock, make_optimizer
from rsslctl.run.build import build_method, compile_step, open_train_split, plugin_versions, setup_device, uses_bf16
from rsslctl.run.logs import RunLogger, main_only
from rsslctl.run.recipe import Recipe
from rsslctl.run.validate import check_run
from rsslctl.runtime import distributed as dist
from rsslctl.runtime.checkpoint import (
    latest_checkpoint,
    rank_states,
    read_meta,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
)
from rsslctl.runtime.seeding import derive_seed
from rsslctl.train import divergence, progress, resume
from rsslctl.train.monitor import monitor_accuracies, monitor_splits
from rsslctl.train.step import optimizer_step

#: (optimizer step, lr, loss, metrics) of a step whose values are still on the device
Pending = tuple[int, float, Tensor, dict[str, Tensor]]


class Trainer:
    """Runs a validated recipe in ``run_dir``; ``fit(resume=True)`` continues from the last checkpoint."""

    def __init__(self, recipe: Recipe, run_dir: Path, quiet: bool = False,
                 on_step: Callable[[int], None] | None = None) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.on_step = on_step  # test hook: called with the global step after each optimizer step
        self.device = setup_device(recipe)
        self.quiet = quiet or not dist.is_main()
        torch.manual_seed(recipe.run.seed)
        self.train = open_train_split(recipe, self.device)  # resident ImageData or a StreamSplit
        self.batch_size = recipe.schedule.batch_size  # the global batch: each rank trains on its share
        # the refusals `rsslctl recipe show` makes too (batch vs data and ranks, device, model, coreset)
        plan = check_run(recipe, self.device, len(self.train), lambda: build_method(recipe, self.device))
        self.method, self.coreset, self.steps_per_epoch = plan.method, plan.coreset, plan.steps_per_epoch
        self._distribute()
        e = recipe.engine  # check_run has refused cuda_graphs without compile on CUDA
        self.training_step = compile_step(self.method, e.cuda_graphs) if e.compile else self.method.training_step
        groups = self.method.parameter_groups()
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = make_optimizer(groups, recipe.optimizer)
        self.replays = self.method.replays
        # the LR schedule counts optimizer steps, so replayed minibatches (free AT) stay aligned with it; coreset
        # epochs are shorter, and the clock keeps the schedule aligned with training progress. A method may ask for
        # the free-AT reference quirk instead (schedule_in_minibatches, see docs/methods.md, "Adversarial training
        # and free AT")
        epoch_steps = self.coreset.epoch_steps() if self.coreset else [self.steps_per_epoch] * recipe.schedule.epochs
        self.clock = StepClock(epoch_steps, self.replays, recipe.schedule.warmup_epochs, recipe.coreset.lr_schedule)
        self.schedule = LRSchedule(recipe.optimizer.lr, recipe.schedule, self.clock,
                                   self.method.schedule_in_minibatches)
        self.method.prepare(on_device(self.train, torch.device("cpu"))[0], self.clock.total_steps)
        self.epoch = 0
        self.position = 0  # minibatches of epoch ``epoch + 1`` trained before a mid-epoch checkpoint
        self.partial = (0.0, 0)  # (sum, count) of that epoch's losses so far
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.monitor_data: tuple | None = None  # (train features' images/labels, test images/labels) for monitors

    # -- the loop ----------------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, from_checkpoint: Path | None = None) -> dict[str, Any]:
        """Train the epochs left (all, or those after the checkpoint resumed from); the last epoch's summary."""
        r = self.recipe
        for stale in dist.rank0_does(lambda: remove_stale_temporaries(self.run_dir)):
            err_console.print(f"removed {stale}, left behind by an interrupted run", highlight=False)
        if resume and self._resume(from_checkpoint):
            return dict(read_meta(latest_checkpoint(self.run_dir)).get("metrics", {}))  # finished already
        images, labels = on_device(self.train, self.device)
        summary: dict[str, Any] = {}
        self._t_run, self._steps_at_start = time.perf_counter(), self.clock.step(self.epoch + 1, self.position)
        self.logger = RunLogger(self.run_dir, main_only(r.logging), r.resolved, self.quiet,
                                purge_step=self._steps_at_start)
        steps_left = sum(self.clock.epoch_steps[self.epoch:]) - self.position
        try:
            with self._metrics_log() as log, progress.bar(self.quiet or self.logger.plain, steps_left) as advance:
                for epoch in range(self.epoch + 1, r.schedule.epochs + 1):
                    summary = self._epoch(epoch, images, labels, log, advance)  # coreset, steps, mid-epoch checkpoints
                    self._end_epoch(epoch, summary)  # monitors, logs, checkpoint
        finally:
            self.logger.close()
        summary["total_seconds"] = time.perf_counter() - self._t_run
        if not self.quiet:
            progress.finished(r, self.device, self.steps_per_epoch, summary, self.run_dir)
        return summary

    def _epoch(self, epoch: int, images: Tensor, labels: Tensor, log: TextIO,
               advance: progress.Advance) -> dict[str, Any]:
        """One epoch (the rest of it after a mid-epoch checkpoint): its summary, also written to ``log``."""
        r = self.recipe
        self.method.train()
        self.method.on_epoch_start(epoch, r.schedule.epochs)
        batches, t_select = self._epoch_batches(epoch, images, labels)
        spe, bs = batches.shape
        start, every = self.position, r.engine.checkpoint_every_steps
        pending: list[Pending] = []
        losses: list[float] = []
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(epoch_batches(self.train, images, labels, batches, self.device, start), start):
            pending += [self._step(epoch, i, rep, x, y) for rep in range(self.replays)]
            advance(1)  # the bar moves every step; its numbers are the last ones read back
            mid_checkpoint = every and (i + 1) % every == 0 and i < spe - 1
            if (i + 1) % r.engine.log_every == 0 or i == spe - 1 or mid_checkpoint:
                losses += self._flush(pending, epoch, log)
                self._report(epoch, i, spe, losses[-1], pending[-1], (i + 1 - start) * bs / (time.perf_counter() - t0),
                             advance)
                pending = []
            if mid_checkpoint:  # the weights after minibatch i, the RNG states for minibatch i + 1
                log.flush()
                self._checkpoint(epoch - 1, {"epoch": epoch, "loss_sum": self.partial[0] + sum(losses),
                                             "loss_count": self.partial[1] + len(losses)}, position=i + 1)
        seconds = time.perf_counter() - t0
        summary = {"epoch": epoch, "loss": (self.partial[0] + sum(losses)) / (self.partial[1] + len(losses)),
                   "seconds": seconds, "images_per_s": (spe - start) * bs / seconds}
        if self.coreset:
            summary.update(images=spe * bs, selected=self.coreset.due(epoch), selection_seconds=t_select)
            if self.coreset.history and self.coreset.history[-1]["epoch"] == epoch:
                summary["selection_precision"] = self.coreset.history[-1]["precision"]
        log.write(json.dumps({"kind": "epoch", **summary}) + "\n")
        log.flush()
        return summary

    def _step(self, epoch: int, i: int, rep: int, images: Tensor, labels: Tensor) -> Pending:
        """One optimizer step; returns its loss and metrics still on the device."""
        e = self.recipe.engine
        step, lr = self.clock.step(epoch, i, rep), self.schedule.at(epoch, i, rep)
        loss, metrics = optimizer_step(lambda: self.training_step(images, labels), self.optimizer, self.params,
                                       self.device, e.precision, lr=lr, grad_clip=e.grad_clip,
                                       cuda_graphs=e.cuda_graphs)
        if not e.sync_bn:  # per-device BN statistics, rank 0's running ones kept (as DataParallel does)
            dist.broadcast_buffers(self.method)
        self.method.after_optimizer_step()
        if self.on_step:
            self.on_step(step)
        return step, lr, loss, metrics

    def _end_epoch(self, epoch: int, summary: dict[str, Any]) -> None:
        """Monitors into ``summary``, the epoch's logs, and its checkpoint when one is due."""
        r = self.recipe
        self.epoch, self.position, self.partial = epoch, 0, (0.0, 0)
        summary.update(self._monitor(epoch))
        self.logger.scalars(summary, self.clock.step(epoch + 1, 0) - 1, "epoch")
        self.logger.progress(progress.epoch_line(epoch, r.schedule.epochs, summary), force=True)
        if epoch % r.engine.checkpoint_every == 0 or epoch == r.schedule.epochs:
            self._checkpoint(epoch, summary)

    # -- pieces of the loop ------------------------------------------------------------------------------------------
    def _distribute(self) -> None:
        """Under torchrun: synchronised batch norm if asked, rank 0's initial weights everywhere, and a random
        stream of its own for every rank but 0 (whose stream continues as in a single-process run)."""
        if dist.world_size() == 1:
            return
        if self.recipe.engine.sync_bn:
            dist.convert_sync_bn(self.method, self.device)
        dist.broadcast_buffers(self.method, parameters=True)
        if not dist.is_main():
            torch.manual_seed(derive_seed(self.recipe.run.seed, -dist.rank()))

    @property
    def total_steps(self) -> int:
        """Optimizer steps the whole run takes."""
        return self.clock.total_steps

    @property
    def schedule_steps(self) -> float:
        """Length of the LR schedule in its own units (optimizer steps, or minibatches under the quirk)."""
        return self.schedule.position(1, 0, 0)[1]

    def _resume(self, from_checkpoint: Path | None) -> bool:
        """Restore and say what was found; True when the run had already finished."""
        found = self.restore(from_checkpoint)
        at = resume.Position(self.epoch, self.position, self.partial) if found else None
        return resume.announce(self.run_dir, at, self.recipe.schedule.epochs, self.quiet)

    def restore(self, from_checkpoint: Path | None = None) -> bool:
        """Load the newest complete checkpoint (or ``from_checkpoint``, one of this run's) and cut the metrics log
        back to it; False if there is none (see ``resume.restore``)."""
        at = resume.restore(self.run_dir, from_checkpoint, self.method, self.optimizer, self.coreset, self.device)
        if at is not None:
            self.epoch, self.position, self.partial = at.epoch, at.within, at.partial
        first_lost = self.clock.step(self.epoch + 1, self.position) if at else 0  # no checkpoint: no records kept
        dist.rank0_does(lambda: resume.truncate_metrics(self.metrics_path, first_lost, self.epoch))
        return at is not None

    @contextlib.contextmanager
    def _metrics_log(self) -> Iterator[TextIO]:
        """metrics.jsonl, appended to; ranks > 0 write no logs, so their lines go nowhere."""
        with open(self.metrics_path if dist.is_main() else os.devnull, "a") as log:
            yield log

    def _meta(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {"recipe": self.recipe.resolved, "plugins": plugin_versions(self.recipe), "metrics": summary,
                "device": str(self.device), "bf16": uses_bf16(self.device, self.recipe.engine.precision),
                "steps_per_epoch": self.steps_per_epoch, "torch": torch.__version__, "world_size": dist.world_size()}

    def _checkpoint(self, epoch: int, summary: dict[str, Any], position: int = 0) -> None:
        extra = rank_states({f"method.{k}": v.cpu() for k, v in self.method.run_state().items()}, rng_state)
        if self.coreset and self.coreset.indices is not None:
            extra["coreset.indices"] = self.coreset.indices
        dist.rank0_does(lambda: save_checkpoint(self.run_dir, epoch, self.method, self.optimizer, self._meta(summary),
                                                keep=self.recipe.engine.keep_checkpoints, extra=extra,
                                                position=position))

    def _monitor(self, epoch: int) -> dict[str, float]:
        """kNN / linear-probe accuracy on frozen features, when the [logging] table asks for them this epoch."""
        o = self.recipe.logging
        knn, probe = (every and epoch % every == 0 for every in (o.knn_every, o.probe_every))
        if not (knn or probe):
            return {}
        def run() -> dict[str, float]:  # on rank 0 only; the others wait for its figures
            if self.monitor_data is None:
                self.monitor_data = monitor_splits(self.recipe, o.monitor_limit)
            return monitor_accuracies(self.method, *self.monitor_data, self.device, self.recipe.engine.precision,
                                      knn, probe, self.recipe.evaluation)
        return dist.rank0_does(run)

    def _epoch_batches(self, epoch: int, images: Tensor, labels: Tensor) -> tuple[Tensor, float]:
        """(minibatch indices [steps, batch] on the host, seconds spent selecting a coreset); resumed inside an
        epoch, its coreset is the one restored from the checkpoint, never selected again."""
        t_select = time.perf_counter()
        rounds = len(self.coreset.history) if self.coreset else 0
        amp = torch.bfloat16 if uses_bf16(self.device, self.recipe.engine.precision) else None
        active = self.coreset.active(epoch, images, labels, self.method, reselect=not self.position,
                                     autocast_dtype=amp) if self.coreset else None
        t_select = time.perf_counter() - t_select
        if self.coreset and len(self.coreset.history) > rounds:  # the selection log: one line per round
            h = self.coreset.history[-1]
            line = (f"epoch {epoch}/{self.recipe.schedule.epochs} coreset round: {h['images']:,} of {h['pool']:,} "
                    f"images selected in {h['seconds']:.2f} s ({h['precision']})")
            if self.logger.plain:
                self.logger.progress(line, force=True)
            elif not self.quiet:
                console.print(line, highlight=False)
        spe, bs = self.clock.epoch_steps[epoch - 1], self.batch_size
        g = torch.Generator().manual_seed(derive_seed(self.recipe.run.seed, epoch))
        perm = torch.randperm(len(images) if active is None else len(active), generator=g)[: spe * bs]
        perm = perm if active is None else active[perm]
        return perm.view(spe, bs), t_select

    def _report(self, epoch: int, i: int, spe: int, loss: float, last: Pending, images_per_s: float,
                advance: progress.Advance) -> None:
        """The bar's text and a plain progress line after a flush (``last``: its last step)."""
        step, lr = last[0], last[1]
        info, line = progress.step_lines(epoch, self.recipe.schedule.epochs, i, spe, loss, lr, images_per_s,
                                         time.perf_counter() - self._t_run, step + 1 - self._steps_at_start,
                                         self.clock.total_steps - step - 1)
        advance(0, info)
        self.logger.progress(line)

    def _flush(self, pending: list[Pending], epoch: int, log: TextIO) -> list[float]:
        """One device→host copy for all pending steps; stop on a non-finite loss or non-finite weights."""
        names = sorted({k for _, _, _, m in pending for k in m})
        table = torch.stack([torch.stack([loss.float()] + [m.get(k, loss).float() for k in names])
                             for _, _, loss, m in pending])
        # losses and metrics averaged over ranks (one collective per flush, not per step); the weights flag is 1 only
        # if every rank's weights are finite, so all ranks stop together
        flag = divergence.finite_weights(self.method).float().view(1)
        values = dist.mean_across_ranks(torch.cat([table.flatten(), flag])).tolist()
        width = table.shape[1]
        rows = [values[i * width:(i + 1) * width] for i in range(len(pending))]
        divergence.refuse_diverged_weights(values[-1], [row[0] for row in rows], epoch, pending[-1][0], self.run_dir)
        out = []
        for (step, lr, _, _), row in zip(pending, rows):
            divergence.refuse_nonfinite_loss(row[0], epoch, step, self.run_dir)
            record = {"epoch": epoch, "step": step, "lr": lr, "loss": row[0], **dict(zip(names, row[1:]))}
            log.write(json.dumps({"kind": "step", **record}) + "\n")
            self.logger.scalars(record, step, "train")
            out.append(row[0])
        return out
