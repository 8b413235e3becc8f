"""The one training engine every method runs on.

Whole training split resident on the device as uint8 (or streamed: ``stream``); batched on-device augmentation inside the
method; bf16 autocast, channels_last, a compiled training step and CUDA graphs as options; per-iteration LR
schedule; metrics read back from the device every ``log_every`` steps only (no host sync per step, see
tests/train/test_sync.py);
atomic checkpoints and exact resume (model, optimizer, RNG states, step counter).

Under torchrun (``rsslctl.runtime.distributed``) every rank holds the split, takes its contiguous share of each global
minibatch (``schedule.batch_size`` is the global batch), averages gradients with the other ranks after each
backward, and rank 0 alone logs and writes checkpoints (with every rank's RNG and run state).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import torch
from torch import Tensor

from rsslctl.runtime import distributed as dist
from rsslctl.run.build import (autocast, build_method, compile_step, load_weights, open_train_split, plugin_versions,
    setup_device, uses_bf16)
from rsslctl.runtime.checkpoint import (CorruptCheckpoint, atomic_write_text, checkpoints, derive_seed,
    latest_checkpoint, load_checkpoint, load_checkpoint_optimizer, read_meta, refuse_nonfinite,
    remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state)
from rsslctl.base.errors import TrainingDiverged, UserError
from rsslctl.run.logs import RunLogger, duration
from rsslctl.train.monitor import monitor_accuracies, monitor_splits
from rsslctl.nn.optim import StepClock, lr_at, make_optimizer
from rsslctl.run.recipe import Recipe
from rsslctl.run.validate import check_run
from rsslctl.data.stream import epoch_batches, on_device
from rsslctl.base.console import console, err_console, progress_bar, summary_table

#: (optimizer step, lr, loss, metrics) of a step whose values are still on the device
Pending = tuple[int, float, Tensor, dict[str, Tensor]]


class Trainer:
    """Runs a validated recipe in ``run_dir``; ``fit(resume=True)`` continues from the last checkpoint."""

    def __init__(self, recipe: Recipe, run_dir: Path, quiet: bool = False,
                 on_step: Callable[[int], None] | None = None) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.quiet = quiet
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
        self.training_step = self._training_step()
        self.params = self.method.optimizer_parameters()
        self.optimizer = make_optimizer(self.params, recipe.optimizer)
        self.replays = self.method.replays
        # the LR schedule counts optimizer steps, so replayed minibatches (free AT) stay aligned with it;
        # coreset epochs are shorter, and the clock keeps the schedule aligned with training progress
        epoch_steps = self.coreset.epoch_steps() if self.coreset else [self.steps_per_epoch] * recipe.schedule.epochs
        self.clock = StepClock(epoch_steps, self.replays, recipe.schedule.warmup_epochs, recipe.coreset.lr_schedule)
        # a method may ask for the free-AT reference quirk instead: schedule length in minibatches, but stepped
        # once per optimizer step, so the cosine is over-stepped m times (see docs/methods.md, "Adversarial training and free AT")
        self.minibatch_clock = StepClock(epoch_steps, 1, recipe.schedule.warmup_epochs, recipe.coreset.lr_schedule)
        self.method.prepare(on_device(self.train, torch.device("cpu"))[0], self.clock.total_steps)
        self.epoch = 0
        self.position = 0  # minibatches of epoch ``epoch + 1`` trained before a mid-epoch checkpoint
        self.partial = (0.0, 0)  # (sum, count) of that epoch's losses so far
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.monitor_data: tuple | None = None  # (train features' images/labels, test images/labels) for monitors

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
        return self.lr_position(1, 0, 0)[1]

    def lr_position(self, epoch: int, i: int, rep: int) -> tuple[float, float, float]:
        """(position, length, warm-up) of optimizer step ``rep`` of minibatch ``i`` of ``epoch`` on the LR schedule."""
        if not self.method.schedule_in_minibatches:
            return self.clock.lr_position(epoch, i, rep)
        _, total, warm = self.minibatch_clock.lr_position(epoch, i)
        return self.clock.step(epoch, i, rep), total, warm

    # -- state -------------------------------------------------------------------------------------
    def restore(self, from_checkpoint: Path | None = None) -> bool:
        """Load the newest complete checkpoint (or ``from_checkpoint``, one of this run's); False if there is none.
        A corrupt checkpoint is named, with the command that resumes from the previous good one; nothing is
        deleted."""
        ckpt = self._pick_checkpoint(from_checkpoint)
        if ckpt is None:
            dist.rank0_does(lambda: self._truncate_metrics(0))  # a run killed before its first checkpoint keeps no records
            return False
        try:
            model, state, meta = load_checkpoint(ckpt)
            refuse_nonfinite(model, str(ckpt))
        except CorruptCheckpoint as exc:
            older = [c for c in checkpoints(self.run_dir) if c.name < ckpt.name]
            hint = (f"resume from the previous one with `rsslctl pretrain --resume {self.run_dir} --from-checkpoint "
                    f"{older[-1]}`" if older else "no older checkpoint is left; start over with --force")
            raise UserError(f"{exc}; {hint} (nothing was deleted)") from None
        load_weights(self.method, model, ckpt)
        try:
            load_checkpoint_optimizer(self.optimizer, state, meta)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise UserError(f"{ckpt}: optimizer state does not match the recipe ({str(exc)[:120]})") from None
        saved_world = int(meta.get("world_size", 1))
        if saved_world != dist.world_size():
            raise UserError(f"{ckpt}: written by a run of {saved_world} process(es), resumed with "
                            f"{dist.world_size()}; resume with the same number (torchrun --nproc_per_node and "
                            "--nnodes), since each rank's random streams and share of the batch are part of the state")
        state = dist.own_state(state)  # ranks > 0 keep their RNG and run state under rank<r>.
        set_rng_state(state)
        self.epoch, self.position = int(meta["epoch"]), int(meta.get("position", 0))
        if self.position:
            self.partial = (float(meta["metrics"]["loss_sum"]), int(meta["metrics"]["loss_count"]))
        self.method.load_run_state({k[len("method."):]: v.to(self.device) for k, v in state.items()
                                    if k.startswith("method.")})
        if self.coreset and "coreset.indices" in state:
            self.coreset.indices = state["coreset.indices"]
        dist.rank0_does(lambda: self._truncate_metrics(self.clock.step(self.epoch + 1, self.position)))
        return True

    def _pick_checkpoint(self, chosen: Path | None) -> Path | None:
        if chosen is None:
            return latest_checkpoint(self.run_dir)
        known = {c.resolve(): c for c in checkpoints(self.run_dir)}
        if Path(chosen).resolve() not in known:
            names = ", ".join(c.name for c in known.values()) or "none"
            raise UserError(f"--from-checkpoint {chosen}: not a complete checkpoint of {self.run_dir} "
                            f"(its checkpoints: {names})")
        return known[Path(chosen).resolve()]

    def _training_step(self) -> Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]:
        """The method's training step, compiled when the recipe asks (see ``build.compile_step``)."""
        e = self.recipe.engine  # check_run has refused cuda_graphs without compile on CUDA
        return compile_step(self.method, e.cuda_graphs) if e.compile else self.method.training_step

    def _truncate_metrics(self, first_lost_step: int) -> None:
        """Drop records a killed run wrote after its last checkpoint, so the log matches the weights."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a partial last line of a killed run
                continue
            if (isinstance(rec, dict) and rec.get("step", -1) < first_lost_step
                    and (rec.get("kind") == "step" or rec.get("epoch", 0) <= self.epoch)):
                keep.append(line)
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))

    def _meta(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {"recipe": self.recipe.resolved, "plugins": plugin_versions(self.recipe), "metrics": summary,
                "device": str(self.device), "bf16": uses_bf16(self.device, self.recipe.engine.precision),
                "steps_per_epoch": self.steps_per_epoch, "torch": torch.__version__, "world_size": dist.world_size()}

    def _checkpoint(self, epoch: int, summary: dict[str, Any], position: int = 0) -> None:
        extra = dist.rank_states({f"method.{k}": v.cpu() for k, v in self.method.run_state().items()}, rng_state)
        if self.coreset and self.coreset.indices is not None:
            extra["coreset.indices"] = self.coreset.indices
        dist.rank0_does(lambda: save_checkpoint(self.run_dir, epoch, self.method, self.optimizer, self._meta(summary),
                                                keep=self.recipe.engine.keep_checkpoints, extra=extra,
                                                position=position))

    # -- loop ----------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, from_checkpoint: Path | None = None) -> dict[str, Any]:
        r = self.recipe
        for stale in dist.rank0_does(lambda: remove_stale_temporaries(self.run_dir)):
            err_console.print(f"removed {stale}, left behind by an interrupted run", highlight=False)
        if resume:
            if not self.restore(from_checkpoint):
                err_console.print(f"{self.run_dir}: no checkpoint yet, so nothing to resume from; training from "
                                  "epoch 1", highlight=False)
            elif self.epoch >= r.schedule.epochs:
                err_console.print(f"{self.run_dir}: already finished all {r.schedule.epochs} epochs; nothing to do "
                                  "(to train longer, start a new run)", highlight=False)
                return dict(read_meta(latest_checkpoint(self.run_dir)).get("metrics", {}))
            elif not self.quiet:
                console.print(f"resuming after epoch {self.epoch}"
                              + (f", minibatch {self.position} of epoch {self.epoch + 1}" if self.position else ""))
        images, labels = on_device(self.train, self.device)
        summary: dict[str, Any] = {}
        self._t_run, self._steps_at_start = time.perf_counter(), self.clock.step(self.epoch + 1, self.position)
        self.logger = RunLogger(self.run_dir, dist.main_only(r.logging), r.resolved, self.quiet,
                                purge_step=self._steps_at_start)
        try:  # ranks > 0 write no logs: no writers, and their metrics lines go nowhere
            with open(self.metrics_path if dist.is_main() else os.devnull, "a") as log, progress_bar(self.quiet or self.logger.plain) as bar:
                task = bar.add_task("pretrain", total=sum(self.clock.epoch_steps[self.epoch:]) - self.position, info="")
                for epoch in range(self.epoch + 1, r.schedule.epochs + 1):
                    summary = self._epoch(epoch, images, labels, log,
                                          lambda n, info=None: bar.update(task, advance=n, **({"info": info} if info else {})))
                    self.epoch, self.position, self.partial = epoch, 0, (0.0, 0)
                    summary.update(self._monitor(epoch))
                    self.logger.scalars(summary, self.clock.step(epoch + 1, 0) - 1, "epoch")
                    self.logger.progress(f"epoch {epoch}/{r.schedule.epochs} done: " + ", ".join(
                        f"{k.replace('_', ' ')} {100 * v:.2f} %" if k.endswith("accuracy") else f"{k} {v:.4g}"
                        for k, v in summary.items() if k in ("loss", "images_per_s") or k.endswith("accuracy")),
                        force=True)
                    if epoch % r.engine.checkpoint_every == 0 or epoch == r.schedule.epochs:
                        self._checkpoint(epoch, summary)
        finally:
            self.logger.close()
        summary["total_seconds"] = time.perf_counter() - self._t_run
        if not self.quiet:
            console.print(summary_table("pretraining finished", {
                "method": r.method.name, "device": str(self.device), "processes (world size)": dist.world_size(),
                "precision": "bf16 autocast" if uses_bf16(self.device, r.engine.precision) else "fp32",
                "epochs": r.schedule.epochs, "steps/epoch": self.steps_per_epoch,
                "mean loss of the last epoch": f"{summary['loss']:.4f}",
                "images/s (last epoch)": f"{summary['images_per_s']:,.0f}",
                **{f"{k.replace('_', ' ')} (last epoch)": f"{100 * v:.2f} %" for k, v in summary.items()
                   if k.endswith("_accuracy")},
                "wall time": f"{summary['total_seconds']:.1f} s", "run directory": str(self.run_dir)}))
        return summary

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

    def _epoch(self, epoch: int, images: Tensor, labels: Tensor, log: TextIO,
               progress: Callable[..., None]) -> dict[str, Any]:
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
            for rep in range(self.replays):
                pending.append(self._step(epoch, i, rep, x, y))
            progress(1)  # the bar moves every step; its numbers are the last ones read back
            mid_checkpoint = every and (i + 1) % every == 0 and i < spe - 1
            if (i + 1) % r.engine.log_every == 0 or i == spe - 1 or mid_checkpoint:
                losses += self._flush(pending, epoch, log)
                step, lr = pending[-1][0], pending[-1][1]
                done = step + 1 - self._steps_at_start
                elapsed = time.perf_counter() - self._t_run
                eta = elapsed / done * (self.clock.total_steps - step - 1)
                info = (f"ep {epoch}/{r.schedule.epochs} loss (last read) {losses[-1]:.4f} lr {lr:.3g} "
                        f"{(i + 1 - start) * bs / (time.perf_counter() - t0):,.0f} img/s")
                progress(0, info)
                self.logger.progress(f"epoch {epoch}/{r.schedule.epochs} step {i + 1}/{spe} {info[info.index('loss'):]} "
                                     f"elapsed {duration(elapsed)} eta {duration(eta)}")
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
        r = self.recipe
        step = self.clock.step(epoch, i, rep)
        lr = lr_at(*self.lr_position(epoch, i, rep), r.optimizer.lr, r.schedule,
                   periodic=self.method.schedule_in_minibatches)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if r.engine.cuda_graphs:  # a new iteration: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(self.device, r.engine.precision), dist.data_parallel_step():
            loss, metrics = self.training_step(images, labels)
        if r.engine.cuda_graphs:  # held until the next flush, so copied out of the graphs' static memory
            metrics = {k: v.clone() for k, v in metrics.items()}
        self.optimizer.zero_grad(set_to_none=True)
        with dist.data_parallel_step():
            loss.backward()
        dist.all_reduce_gradients(self.params)  # the mean over ranks: the gradient of the global batch's loss
        if r.engine.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, r.engine.grad_clip)
        self.optimizer.step()
        if not r.engine.sync_bn:  # per-device BN statistics, rank 0's running ones kept (as DataParallel does)
            dist.broadcast_buffers(self.method)
        self.method.after_optimizer_step()
        if self.on_step:
            self.on_step(step)
        return step, lr, loss.detach().clone() if r.engine.cuda_graphs else loss.detach(), metrics

    def _flush(self, pending: list[Pending], epoch: int, log: TextIO) -> list[float]:
        """One device→host copy for all pending steps; stop on a non-finite loss."""
        names = sorted({k for _, _, _, m in pending for k in m})
        table = torch.stack([torch.stack([loss.float()] + [m.get(k, loss).float() for k in names])
                             for _, _, loss, m in pending])
        # the weights after the last step, checked in the same device→host copy: a diverging step whose loss was
        # still finite cannot slip into a checkpoint
        weights_ok = torch.stack([t.isfinite().all() for t in self.method.state_dict().values()
                                  if t.is_floating_point()]).all()
        # losses and metrics averaged over ranks (one collective per flush, not per step); the flag is 1 only if
        # every rank's weights are finite, so all ranks stop together
        values = dist.mean_across_ranks(torch.cat([table.flatten(), weights_ok.float().view(1)])).tolist()
        width = table.shape[1]
        rows = [values[i * width:(i + 1) * width] for i in range(len(pending))]
        if values[-1] != 1.0 and all(math.isfinite(row[0]) for row in rows):
            last = latest_checkpoint(self.run_dir)
            kept = f"the last good checkpoint is kept at {last}" if last else "no checkpoint had been written yet"
            raise TrainingDiverged(f"weights became non-finite by epoch {epoch}, step {pending[-1][0]}; {kept}; "
                                   "lower optimizer.lr or set engine.grad_clip, then resume with --resume")
        out = []
        for (step, lr, _, _), row in zip(pending, rows):
            if not math.isfinite(row[0]):
                last = latest_checkpoint(self.run_dir)
                kept = f"the last good checkpoint is kept at {last}" if last else "no checkpoint had been written yet"
                raise TrainingDiverged(f"loss became {row[0]} at epoch {epoch}, step {step}; {kept}; "
                                       "lower optimizer.lr or set engine.grad_clip, then resume with --resume")
            record = {"epoch": epoch, "step": step, "lr": lr, "loss": row[0], **dict(zip(names, row[1:]))}
            log.write(json.dumps({"kind": "step", **record}) + "\n")
            self.logger.scalars(record, step, "train")
            out.append(row[0])
        return out
