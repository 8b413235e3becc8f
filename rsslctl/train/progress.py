"""What pretraining shows a person: the live bar, plain progress lines with an ETA, and the closing summary table.

Every figure shown is one the engine already read back from the device; nothing here touches a tensor.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from rsslctl.base.console import console, progress_bar, summary_table
from rsslctl.run.build import uses_bf16
from rsslctl.run.logs import duration
from rsslctl.run.recipe import Recipe
from rsslctl.runtime import distributed as dist

#: moves the bar ``n`` steps on and, given ``info``, replaces its text
Advance = Callable[..., None]


@contextlib.contextmanager
def bar(hidden: bool, total: int) -> Iterator[Advance]:
    """The live progress bar over ``total`` steps (nothing shown when ``hidden``)."""
    with progress_bar(hidden) as b:
        task = b.add_task("pretrain", total=total, info="")
        yield lambda n, info=None: b.update(task, advance=n, **({"info": info} if info else {}))


def step_lines(epoch: int, epochs: int, i: int, steps: int, loss: float, lr: float, images_per_s: float,
               elapsed: float, done: int, left: int) -> tuple[str, str]:
    """(the bar's text, a plain line) after minibatch ``i`` (0-based) of ``steps``; ``done`` optimizer steps took
    ``elapsed`` seconds, ``left`` remain."""
    info = f"ep {epoch}/{epochs} loss (last read) {loss:.4f} lr {lr:.3g} {images_per_s:,.0f} img/s"
    eta = elapsed / done * left
    return info, (f"epoch {epoch}/{epochs} step {i + 1}/{steps} {info[info.index('loss'):]} "
                  f"elapsed {duration(elapsed)} eta {duration(eta)}")


def epoch_line(epoch: int, epochs: int, summary: dict[str, Any]) -> str:
    """The plain line at the end of an epoch: loss, throughput and any monitor accuracies."""
    return f"epoch {epoch}/{epochs} done: " + ", ".join(
        f"{k.replace('_', ' ')} {100 * v:.2f} %" if k.endswith("accuracy") else f"{k} {v:.4g}"
        for k, v in summary.items() if k in ("loss", "images_per_s") or k.endswith("accuracy"))


def finished(r: Recipe, device: torch.device, steps_per_epoch: int, summary: dict[str, Any], run_dir: Path) -> None:
    """The table printed when pretraining ends."""
    console.print(summary_table("pretraining finished", {
        "method": r.method.name, "device": str(device), "processes (world size)": dist.world_size(),
        "precision": "bf16 autocast" if uses_bf16(device, r.engine.precision) else "fp32",
        "epochs": r.schedule.epochs, "steps/epoch": steps_per_epoch,
        "mean loss of the last epoch": f"{summary['loss']:.4f}",
        "images/s (last epoch)": f"{summary['images_per_s']:,.0f}",
        **{f"{k.replace('_', ' ')} (last epoch)": f"{100 * v:.2f} %" for k, v in summary.items()
           if k.endswith("_accuracy")},
        "wall time": f"{summary['total_seconds']:.1f} s", "run directory": str(run_dir)}))
