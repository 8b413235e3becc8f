"""The one training engine every method runs on.

Whole training split resident on the device as uint8; batched on-device augmentation inside the
method; bf16 autocast, channels_last and torch.compile as options; per-iteration LR schedule;
metrics read back from the device every ``log_every`` steps only (no host sync per step);
atomic checkpoints and exact resume (model, optimizer, RNG states, step counter).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from . import registry
from .augment import ViewAugment
from .coreset import CoresetRun, method_target
from .checkpoint import latest_checkpoint, load_checkpoint, optimizer_from_flat, save_checkpoint, set_rng_state
from .data import ImageData
from .encoder import build_encoder
from .errors import TrainingDiverged, UserError
from .method import Method
from .optim import StepClock, lr_at, make_optimizer
from .recipe import Recipe
from .ui import console, progress_bar, summary_table


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"engine.device = {name!r}, but CUDA is not available here; use \"cpu\" or \"auto\"")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"engine.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 dot-product instructions (AVX512-BF16 or AMX), where bf16 autocast is ~2x faster;
    elsewhere bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(device: torch.device, precision: str) -> bool:
    """precision 'auto' = bf16 on CUDA and on CPUs with native bf16, fp32 otherwise."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return precision == "bf16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``uses_bf16``; losses and attack objectives cast themselves back to fp32."""
    if not uses_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def load_split(recipe: Recipe, split: str) -> ImageData:
    """Load a split through the dataset plugin (downloading only if the recipe asks), resized to image_size."""
    cls = recipe.plugin_cls["data"]
    if split not in cls.splits:
        raise UserError(f"data: dataset '{cls.name}' has no split '{split}'; available: {', '.join(cls.splits)}")
    dataset = cls(recipe.plugin["data"], Path(recipe.data.root))
    try:
        data = dataset.load(split)
    except UserError:
        if not recipe.data.download:
            raise
        console.print(f"[bold]downloading[/] {cls.name} into {Path(recipe.data.root).resolve()}")
        dataset.download()
        data = dataset.load(split)
    return data.resized(recipe.data.image_size)


def load_train_split(recipe: Recipe) -> ImageData:
    """The recipe's training split, cut to its first ``data.limit`` images when a limit is set."""
    train = load_split(recipe, recipe.data.train_split)
    if recipe.data.limit:
        train = train.subset(torch.arange(min(recipe.data.limit, len(train))))
    return train


def build_method(recipe: Recipe, device: torch.device) -> Method:
    """Backbone → encoder → attack → augmentation → method, on ``device`` (channels_last if asked)."""
    method_cls = recipe.plugin_cls["method"]
    backbone = recipe.plugin_cls["backbone"](recipe.plugin["backbone"])
    encoder = build_encoder(backbone, recipe.encoder, method_cls.wants_dual_bn)
    attack_cls = recipe.plugin_cls["attack"]
    attack = attack_cls(recipe.plugin["attack"]) if attack_cls else None
    augment = ViewAugment(recipe.data.image_size, recipe.augment)
    fmt = torch.channels_last if recipe.engine.channels_last else torch.contiguous_format

    def views(x: Tensor) -> Tensor:
        return augment(x).contiguous(memory_format=fmt)

    method = method_cls(encoder, recipe.plugin["method"], attack, views)
    method.augment_module = augment  # kept reachable for schedules such as DynACL's strength
    method.to(device=device, memory_format=fmt)
    if recipe.engine.compile:
        encoder.backbone.compile()
    return method


def plugin_versions(recipe: Recipe) -> dict[str, str]:
    out = {}
    for table, kind in (("data", "dataset"), ("backbone", "backbone"), ("method", "method"), ("attack", "attack"),
                       ("coreset", "coreset")):
        cls = recipe.plugin_cls.get(table)
        if cls is not None:
            info = registry.registry().entries(kind)[cls.name]
            out[f"{kind}:{cls.name}"] = f"{info.package} {info.version}"
    return out


class Trainer:
    """Runs a validated recipe in ``run_dir``; ``fit(resume=True)`` continues from the last checkpoint."""

    def __init__(self, recipe: Recipe, run_dir: Path, quiet: bool = False,
                 on_step: Callable[[int], None] | None = None) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        self.on_step = on_step  # test hook: called with the global step after each optimizer step
        e = recipe.engine
        if e.threads:
            torch.set_num_threads(e.threads)
        self.device = select_device(e.device)
        torch.manual_seed(recipe.run.seed)
        self.train = load_train_split(recipe)
        self.batch_size = recipe.schedule.batch_size
        self.steps_per_epoch = len(self.train) // self.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"schedule.batch_size = {self.batch_size} exceeds the {len(self.train)} training images; "
                            "lower schedule.batch_size")
        self.method = build_method(recipe, self.device)
        self.params = [p for p in self.method.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, recipe.optimizer)
        self.replays = int(getattr(self.method, "replays", 1))
        self.coreset = self._make_coreset()
        if self.coreset:  # the validation split is held out for the whole run
            self.steps_per_epoch = len(self.coreset.pool) // self.batch_size
        # the LR schedule counts optimizer steps, so replayed minibatches (free AT) stay aligned with it;
        # coreset epochs are shorter, and the clock keeps the schedule aligned with training progress
        epoch_steps = self.coreset.epoch_steps() if self.coreset else [self.steps_per_epoch] * recipe.schedule.epochs
        self.clock = StepClock(epoch_steps, self.replays, recipe.schedule.warmup_epochs, recipe.coreset.lr_schedule)
        # a method may ask for the free-AT reference quirk instead: schedule length in minibatches, but stepped
        # once per optimizer step, so the cosine is over-stepped m times (METHODS.md §8.3)
        self.schedule_in_minibatches = bool(getattr(self.method, "schedule_in_minibatches", False))
        self.minibatch_clock = StepClock(epoch_steps, 1, recipe.schedule.warmup_epochs, recipe.coreset.lr_schedule)
        self.epoch = 0
        self.metrics_path = self.run_dir / "metrics.jsonl"

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
        if not self.schedule_in_minibatches:
            return self.clock.lr_position(epoch, i, rep)
        _, total, warm = self.minibatch_clock.lr_position(epoch, i)
        return self.clock.step(epoch, i, rep), total, warm

    # -- state -------------------------------------------------------------------------------------
    def restore(self) -> bool:
        """Load the newest complete checkpoint; False if there is none."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        model, state, meta = load_checkpoint(ckpt)
        missing, unexpected = self.method.load_state_dict(model, strict=False)
        if missing or unexpected:
            raise UserError(f"{ckpt}: checkpoint does not match the recipe's model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        optimizer_from_flat(self.optimizer, state, meta["optimizer"])
        set_rng_state(state)
        self.epoch = int(meta["epoch"])
        self.method.load_run_state({k[len("method."):]: v.to(self.device) for k, v in state.items()
                                    if k.startswith("method.")})
        if self.coreset and "coreset.indices" in state:
            self.coreset.indices = state["coreset.indices"]
        self._truncate_metrics(self.clock.step(self.epoch + 1, 0))
        return True

    def _make_coreset(self) -> CoresetRun | None:
        """The [coreset] schedule, or None when the run trains on the whole split every epoch."""
        r = self.recipe
        o, cls = r.coreset, r.plugin_cls.get("coreset")
        if cls is None and not o.indices_file:
            return None
        selector = cls(r.plugin["coreset"]) if cls else None
        if selector is not None and selector.needs_target:
            method_target(self.method)  # fail now, not after the warm-up
        return CoresetRun(o, selector, len(self.train), self.batch_size, r.schedule.epochs, r.run.seed,
                          r.resolved["data"]["name"])

    def _truncate_metrics(self, first_lost_step: int) -> None:
        """Drop records a killed run wrote after its last checkpoint, so the log matches the weights."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("step", -1) < first_lost_step and rec.get("epoch", 0) <= self.epoch:
                keep.append(line)
        self.metrics_path.write_text("".join(k + "\n" for k in keep))

    def _meta(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {"recipe": self.recipe.resolved, "plugins": plugin_versions(self.recipe), "metrics": summary,
                "device": str(self.device), "bf16": uses_bf16(self.device, self.recipe.engine.precision),
                "steps_per_epoch": self.steps_per_epoch, "torch": torch.__version__}

    # -- loop ----------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        r = self.recipe
        if resume and self.restore() and not self.quiet:
            console.print(f"resuming after epoch {self.epoch}")
        images = self.train.images.to(self.device)
        labels = self.train.labels.to(self.device)
        n, bs, spe = len(self.train), self.batch_size, self.steps_per_epoch
        peak = r.optimizer.lr
        summary: dict[str, Any] = {}
        log = open(self.metrics_path, "a")
        start_epoch = self.epoch
        t_run = time.perf_counter()
        with progress_bar(self.quiet) as bar:
            task = bar.add_task("pretrain", total=sum(self.clock.epoch_steps[start_epoch:]), info="")
            for epoch in range(start_epoch + 1, r.schedule.epochs + 1):
                self.method.train()
                self.method.on_epoch_start(epoch, r.schedule.epochs)
                t_select = time.perf_counter()
                active = self.coreset.active(epoch, images, labels, self.method) if self.coreset else None
                t_select = time.perf_counter() - t_select
                spe = self.clock.epoch_steps[epoch - 1]
                g = torch.Generator().manual_seed(r.run.seed * 1_000_003 + epoch)
                perm = torch.randperm(n if active is None else len(active), generator=g)[: spe * bs]
                perm = (perm if active is None else active[perm]).to(self.device).view(spe, bs)
                pending: list[tuple[int, float, Tensor, dict[str, Tensor]]] = []
                losses: list[float] = []
                t0 = time.perf_counter()
                for i in range(spe):
                    idx = perm[i]
                    for rep in range(self.replays):
                        step = self.clock.step(epoch, i, rep)
                        lr = lr_at(*self.lr_position(epoch, i, rep), peak, r.schedule, periodic=self.schedule_in_minibatches)
                        for group in self.optimizer.param_groups:
                            group["lr"] = lr
                        with autocast(self.device, r.engine.precision):
                            loss, metrics = self.method.training_step(images[idx], labels[idx])
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        if r.engine.grad_clip:
                            torch.nn.utils.clip_grad_norm_(self.params, r.engine.grad_clip)
                        self.optimizer.step()
                        self.method.after_optimizer_step()
                        pending.append((step, lr, loss.detach(), metrics))
                        if self.on_step:
                            self.on_step(step)
                    if (i + 1) % r.engine.log_every == 0 or i == spe - 1:
                        losses += self._flush(pending, epoch, log)
                        elapsed = time.perf_counter() - t0
                        bar.update(task, advance=len(pending) // self.replays, info=f"ep {epoch}/{r.schedule.epochs} loss {losses[-1]:.4f} "
                                   f"lr {lr:.3g} {(i + 1) * bs / elapsed:,.0f} img/s")
                        pending = []
                seconds = time.perf_counter() - t0
                summary = {"epoch": epoch, "loss": sum(losses) / len(losses), "seconds": seconds,
                           "images_per_s": spe * bs / seconds}
                if self.coreset:
                    summary.update(images=spe * bs, selected=self.coreset.due(epoch), selection_seconds=t_select)
                log.write(json.dumps({"kind": "epoch", **summary}) + "\n")
                log.flush()
                self.epoch = epoch
                if epoch % r.engine.checkpoint_every == 0 or epoch == r.schedule.epochs:
                    current = self.coreset.indices if self.coreset else None
                    extra = {f"method.{k}": v for k, v in self.method.run_state().items()}
                    if current is not None:
                        extra["coreset.indices"] = current
                    save_checkpoint(self.run_dir, epoch, self.method, self.optimizer, self._meta(summary),
                                    keep=r.engine.keep_checkpoints, extra=extra)
        log.close()
        summary["total_seconds"] = time.perf_counter() - t_run
        if not self.quiet:
            console.print(summary_table("pretraining finished", {
                "method": r.resolved["method"]["name"], "device": str(self.device),
                "precision": "bf16 autocast" if uses_bf16(self.device, r.engine.precision) else "fp32",
                "epochs": r.schedule.epochs, "steps/epoch": self.steps_per_epoch,
                "final loss": f"{summary['loss']:.4f}", "images/s (last epoch)": f"{summary['images_per_s']:,.0f}",
                "wall time": f"{summary['total_seconds']:.1f} s", "run directory": str(self.run_dir)}))
        return summary

    def _flush(self, pending: list, epoch: int, log: Any) -> list[float]:
        """One device→host copy for all pending steps; stop on a non-finite loss."""
        names = sorted({k for _, _, _, m in pending for k in m})
        rows = torch.stack([torch.stack([loss.float()] + [m.get(k, loss).float() for k in names])
                            for _, _, loss, m in pending]).tolist()
        out = []
        for (step, lr, _, _), row in zip(pending, rows):
            if not math.isfinite(row[0]):
                last = latest_checkpoint(self.run_dir)
                kept = f"the last good checkpoint is kept at {last}" if last else "no checkpoint had been written yet"
                raise TrainingDiverged(f"loss became {row[0]} at epoch {epoch}, step {step}; {kept}; "
                                       "lower optimizer.lr or set engine.grad_clip, then resume with --resume")
            log.write(json.dumps({"kind": "step", "epoch": epoch, "step": step, "lr": lr, "loss": row[0],
                                  **dict(zip(names, row[1:]))}) + "\n")
            out.append(row[0])
        return out
