"""One optimizer step, the same for pretraining (``Trainer``) and the supervised loop (``train_classifier``).

The schedule's LR, forward under autocast, backward, gradients averaged over ranks (a no-op alone), optional
clipping, the optimizer's step. Nothing here reads a value back from the device, so a step never makes the host
wait (tests/train/test_sync.py). There is no loss scaler: autocast is bf16 or nothing, and bf16 keeps fp32's exponent
range.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import Tensor

from rsslctl.run.build import autocast
from rsslctl.runtime import distributed as dist

T = TypeVar("T")


def optimizer_step(forward: Callable[[], tuple[Tensor, T]], optimizer: torch.optim.Optimizer, params: list[Tensor],
                   device: torch.device, precision: str, *, lr: float | None = None, scale: float = 1.0,
                   grad_clip: float = 0.0, cuda_graphs: bool = False) -> tuple[Tensor, T]:
    """Set ``lr`` (the schedule's value for this step) on every param group (× the group's ``lr_scale``), run
    ``forward() -> (loss, outputs)`` and take one step of ``optimizer`` on ``loss`` × ``scale`` (a rank's share of an
    uneven minibatch, see ``dist.split_batch``); returns the detached loss and the outputs, still on the device.
    ``cuda_graphs``: the step replays CUDA graphs, so it marks a new iteration first and copies the loss and a dict
    of output tensors out of the graphs' static memory (the next replay overwrites it)."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(device, precision), dist.data_parallel_step():
        loss, outputs = forward()
    if cuda_graphs and isinstance(outputs, dict):
        outputs = {k: v.clone() for k, v in outputs.items()}  # type: ignore[assignment]
    optimizer.zero_grad(set_to_none=True)
    with dist.data_parallel_step():
        (loss * scale if scale != 1.0 else loss).backward()
    dist.all_reduce_gradients(params)  # the mean over ranks: the gradient of the global batch's loss
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach().clone() if cuda_graphs else loss.detach(), outputs
