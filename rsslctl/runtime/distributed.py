"""Data-parallel runs on ``torch.distributed``, launched by ``torchrun`` (one process per device, many machines).

Without torchrun's environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) nothing here does anything: one process,
``world_size() == 1``, every collective is the identity, and the engine behaves exactly as it does alone.

Under torchrun each process ("rank") pins itself to its local device, joins a process group (NCCL on CUDA, gloo on
CPU) and trains on its share of every global minibatch. The conventions every part of rsslctl follows:

* **Loss semantics.** Each rank's loss is its share of the global loss, and the global loss is the mean of the
  ranks' losses. Weight gradients are therefore averaged across ranks (``all_reduce_gradients``). Contrastive losses
  gather the embeddings of every rank *with gradient* (``gather_with_grad``) and compute the whole global loss on
  each rank; the gather's backward sums what every rank's loss sends back, so the averaged weight gradient equals
  the single-process gradient of the global batch exactly (SimCLR's global negatives, as in lightly's
  ``gather_distributed``).
* **Input gradients** (adversarial attacks) taken by autograd through those collectives are the gradient of the
  *sum* of the ranks' objectives; ``input_grad_scale`` (1/W inside a data-parallel training step, else 1) turns
  them into the gradient of the global (mean) objective w.r.t. this rank's own inputs.
* **Output.** Only rank 0 prints, logs and writes files; the other ranks' consoles are muted.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rsslctl.base.errors import UserError

T = TypeVar("T")

#: how long a rank waits in a collective before the process group gives up (rank 0 alone may run the monitors,
#: write checkpoints or evaluate meanwhile)
TIMEOUT = datetime.timedelta(minutes=60)
#: gradient all-reduce bucket size (bytes): few, large messages, as DDP's 25 MB buckets
BUCKET_BYTES = 25 << 20

_in_step = False  # set by ``data_parallel_step``


# -- where am I --------------------------------------------------------------------------------------------------
def launched() -> bool:
    """True when torchrun (or any launcher setting RANK, WORLD_SIZE and LOCAL_RANK) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def active() -> bool:
    """True when this process is part of an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks (processes) of the run; 1 without torchrun."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's global rank (0 … world_size − 1); 0 without torchrun."""
    return dist.get_rank() if active() else 0


def local_rank() -> int:
    """This process's rank on its machine (its device index); 0 without torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main() -> bool:
    """True on the rank that prints, logs and writes files (rank 0); before the process group exists, what torchrun's
    RANK says (so a command can take the run's lock on rank 0 only before the engine joins the group)."""
    return rank() == 0 if active() else os.environ.get("RANK", "0") == "0" or not launched()


def mute_other_ranks() -> None:
    """Silence the consoles of every rank but 0 (called first thing by the CLI, so even errors raised before the
    process group exists are printed once)."""
    if launched() and os.environ.get("RANK", "0") != "0":
        from rsslctl.base.console import console, err_console
        console.quiet = err_console.quiet = True


def refuse_many(command: str) -> None:
    """UserError (on every rank alike, before any collective) for a command that does not run data-parallel yet."""
    if launched() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"rsslctl {command} runs in one process; launch it without torchrun (or with "
                        "--nproc_per_node=1); pretrain, select-coreset and finetune are the commands that use many "
                        "processes")


# -- set-up --------------------------------------------------------------------------------------------------------
def setup(device: str, backend: str = "auto", join_timeout_s: float = 300,
          timeout_s: float = TIMEOUT.total_seconds()) -> torch.device:
    """The device this process trains on; under torchrun also joins the process group and pins the local device.

    ``device``: the recipe's engine.device (auto, cpu, cuda, cuda:N); under torchrun "auto"/"cuda" mean this rank's
    local GPU (cuda:LOCAL_RANK). ``backend``: auto (NCCL on CUDA, gloo on CPU), nccl or gloo. The other ranks must
    join within ``join_timeout_s``; a collective gives up after ``timeout_s`` (see ``agreement.join``).
    """
    if not launched():
        return _plain_device(device)
    if device.startswith("cuda:") and int(os.environ["WORLD_SIZE"]) > 1:
        raise UserError(f"engine.device = {device!r} under torchrun: every rank would use that one GPU; set "
                        "engine.device = \"cuda\" (or \"auto\"): each rank then takes the GPU of its LOCAL_RANK")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        dev = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise UserError(f"engine.device = {device!r}, but CUDA is not available here; use \"cpu\" or \"auto\"")
        if local_rank() >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} GPU(s) visible; lower "
                            "torchrun --nproc_per_node to the number of GPUs")
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    chosen = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if chosen == "nccl" and dev.type != "cuda":
        raise UserError("engine.backend = \"nccl\" needs CUDA devices, but this run is on the CPU; set "
                        "engine.backend = \"gloo\" (or \"auto\")")
    if not active():
        from rsslctl.runtime.agreement import join
        join(chosen, dev, join_timeout_s, timeout_s)
    return dev


def _plain_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"engine.device = {name!r}, but CUDA is not available here; use \"cpu\" or \"auto\"")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"engine.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def shutdown() -> None:
    """Leave the process group (at the end of a command), so the launcher sees a clean exit."""
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (no-op alone)."""
    if world_size() > 1:
        dist.barrier()


# -- the global batch -------------------------------------------------------------------------------------------
def local_batch(global_batch: int, where: str = "schedule.batch_size", world: int | None = None) -> int:
    """This rank's share of a global minibatch (of a run of ``world`` ranks, default this one's); UserError (on every
    rank alike) when it does not divide."""
    w = world or world_size()
    if global_batch % w:
        lower, upper = global_batch - global_batch % w, global_batch + w - global_batch % w
        raise UserError(f"{where} = {global_batch} is the global batch and does not divide by the {w} processes of "
                        f"this run; set it to a multiple of {w} (e.g. {lower or upper} or {upper})")
    return global_batch // w


def shard(t: Tensor) -> Tensor:
    """This rank's contiguous slice of a global batch ``t`` (dim 0): rows r·n/W … (r+1)·n/W − 1."""
    n = t.shape[0] // world_size()
    return t[rank() * n:(rank() + 1) * n]


def collective() -> bool:
    """True inside a data-parallel training step of a run with more than one rank: every rank runs the same code in
    lockstep, so losses may gather across ranks. Outside one (coreset shards, evaluation, monitors on rank 0) every
    rank computes on its own and the gathers below are the identity."""
    return _in_step and world_size() > 1


def split_batch(*ts: Tensor) -> tuple[list[Tensor], float]:
    """This rank's part of a minibatch of any size (``tensor_split``: parts differ by at most one row) and the factor
    W·n_r/n by which its local-mean loss is scaled before the backward, so that the gradients averaged over ranks are
    the gradient of the minibatch's mean loss. Alone: the tensors and 1.0."""
    w = world_size()
    if w == 1:
        return list(ts), 1.0
    parts = [t.tensor_split(w)[rank()] for t in ts]
    return parts, w * parts[0].shape[0] / ts[0].shape[0]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` (same shape on each) along dim 0 in rank order, keeping the gradient: the
    backward hands each rank the sum of what every rank's loss sends to its rows. Identity outside ``collective``."""
    if not collective():
        return x
    from torch.distributed.nn.functional import all_gather  # autograd-aware all_gather, maintained by PyTorch
    with warnings.catch_warnings():  # deprecated in favour of a private (underscored) module; still supported
        warnings.filterwarnings("ignore", category=FutureWarning)
        return torch.cat(all_gather(x), dim=0)


def all_reduce_with_grad(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks, differentiable (backward: the sum of the ranks' gradients). Identity outside
    ``collective``."""
    if not collective():
        return x
    from torch.distributed.nn.functional import all_reduce
    with warnings.catch_warnings():  # deprecated like all_gather above
        warnings.filterwarnings("ignore", category=FutureWarning)
        return all_reduce(x)


@contextlib.contextmanager
def data_parallel_step() -> Iterator[None]:
    """Marks one training step, run by every rank in lockstep (see ``collective``)."""
    global _in_step
    previous, _in_step = _in_step, True
    try:
        yield
    finally:
        _in_step = previous


def input_grad_scale() -> float:
    """Factor turning an input gradient taken through the collectives into the gradient of the global objective (the
    mean of the ranks' objectives) w.r.t. this rank's inputs: 1/W inside a ``collective`` step, 1 elsewhere."""
    return 1.0 / world_size() if collective() else 1.0


# -- gradients, metrics, buffers -------------------------------------------------------------------------------
def all_reduce_gradients(params: list[Tensor]) -> None:
    """Average the gradients of ``params`` across ranks, in place, in ~25 MB flat buckets (no-op alone).

    Why not ``DistributedDataParallel``: a method's training step runs its encoder many times (attack iterations in
    eval mode, clean and adversarial BN routes, momentum encoders), and some parameters go unused in a step (the
    other BN route); DDP's reducer expects one forward per backward and needs find_unused_parameters for that. An
    explicit bucketed all-reduce after ``backward`` gives the same averaged gradient for any Method without those
    constraints; it does not overlap communication with the backward pass (see docs/scaling.md).
    """
    w = world_size()
    if w == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(w)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _buckets(tensors: list[Tensor]) -> Iterator[list[Tensor]]:
    """Consecutive groups of same-dtype tensors of about ``BUCKET_BYTES`` each."""
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > BUCKET_BYTES or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def mean_across_ranks(t: Tensor) -> Tensor:
    """Mean over ranks of ``t`` (no gradient); one collective, no host sync. Identity when alone."""
    if world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out.div_(world_size())


def broadcast_buffers(module: nn.Module, parameters: bool = False) -> None:
    """Copy rank 0's floating-point buffers (BN running statistics), and its parameters too if asked, to every rank,
    in ~25 MB messages (no-op alone)."""
    if world_size() == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if parameters:
        buffers = [p.data for p in module.parameters()] + buffers
    for bucket in _buckets(buffers):
        flat = torch.cat([b.reshape(-1) for b in bucket])
        dist.broadcast(flat, 0)
        offset = 0
        for b in bucket:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


# -- rank 0 does, everyone learns ---------------------------------------------------------------------------------
def rank0_does(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank. If it raises there, every rank raises too (rank 0
    its own exception, the others a UserError with the same line that their muted console does not print), so no
    rank is left waiting. Alone: just ``fn()``."""
    if world_size() == 1:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if is_main():
        try:
            box[0] = ("ok", fn())
        except BaseException as exc:  # noqa: BLE001 — re-raised below, after the other ranks are told
            error, box[0] = exc, ("error", f"{type(exc).__name__}: {exc}", getattr(exc, "exit_code", 1))
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0][0] == "error":
        failure = UserError(f"rank 0 failed: {box[0][1]}")
        failure.exit_code = box[0][2]
        failure.secondary = True  # rank 0 reports the error itself
        raise failure
    return box[0][1]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (a list in rank order), None on the others; ``[obj]`` when alone."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank, in rank order (picklable objects; tensors best on the CPU); ``[obj]``
    alone. Used to merge work sharded across ranks, e.g. coreset gradients."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# -- synchronised batch norm -----------------------------------------------------------------------------------------
class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch, for CPU ranks (gloo): PyTorch's
    ``nn.SyncBatchNorm`` runs on GPUs only. Sums over ranks go through differentiable all-reduces (two per layer:
    the mean, then the centred second moment, as a two-pass single-process batch norm); running statistics are
    updated exactly like ``nn.BatchNorm2d`` with the global count. Outside ``collective`` it is a plain batch norm."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and collective()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1] * world_size()  # every rank holds an equal share
        dtype, x = x.dtype, x.float()  # statistics in fp32 under bf16 autocast too
        mean = all_reduce_with_grad(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = all_reduce_with_grad((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * (n / max(n - 1, 1)), alpha=f)
        return y.to(dtype)


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """Every batch norm of ``module`` (both routes of a dual-BN encoder included) as a synchronised one, in place:
    ``nn.SyncBatchNorm`` on CUDA, ``CpuSyncBatchNorm`` on the CPU; parameters and running statistics are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, CpuSyncBatchNorm):
            bn = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            bn.train(child.training)
            setattr(module, name, bn.to(device))
        else:
            convert_sync_bn(child, device)
    return module
