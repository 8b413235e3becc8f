"""The training step never makes the host wait for the device.

A CUDA step is sync-free when no op reads device memory back to the host: no ``.item()``/``bool()``/``float()`` of a
device tensor (``_local_scalar_dense``, ``is_nonzero``), no boolean-mask indexing (``x[mask]`` needs ``nonzero`` to size
its output), no ``masked_select``/``unique``/…, no copy to the CPU. On a CPU run every tensor is host memory, so a plain
op counter cannot tell a read of device data from a read of a parameter kornia drew on the CPU (which is fine on
CUDA). These tests therefore run the step on the ``meta`` device — shapes without storage, whose data the host can no
more read than a GPU's — under a dispatch mode that names any reading op and where it was called from. CPU-side work
(kornia's random parameters, Adam's step counter) still runs on the CPU, exactly as it would beside a GPU. Meta runs
compute nothing, so this is fast, and it needs no GPU: CI keeps the promise.
"""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import teacher_overrides, tiny_backbone
from torch.utils._python_dispatch import TorchDispatchMode

from rsslctl.base.registry import registry
from rsslctl.run.recipe import load
from rsslctl.train.engine import Trainer

META = torch.device("meta")
#: ops that read device data back to the host (or, like nonzero, need its values to size their output)
READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "argwhere", "masked_select",
         "equal", "allclose", "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave",
         "bincount", "histc", "_assert_tensor_metadata_with_data"}


class HostSync(AssertionError):
    pass


def _where() -> str:
    """The innermost project (or kornia) frames of the current Python stack."""
    frames = [f for f in traceback.extract_stack()
              if "/torch/" not in f.filename and not f.filename.endswith("test_sync.py")]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-3:]))


class SyncDetector(TorchDispatchMode):
    """Raises ``HostSync`` naming the op and the calling code when an op would read device memory on the host."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_device = any(t.device == META for t in tensors)
        if on_device and name in READS:
            raise HostSync(f"aten::{name} reads device memory at {_where()}")
        if on_device and name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
                raise HostSync(f"aten::{name} with a boolean mask (needs nonzero) at {_where()}")
        if name in ("_to_copy", "copy_"):
            src, dst = (args[1], args[0].device) if name == "copy_" else (args[0], kwargs.get("device"))
            if src.device == META and dst is not None and torch.device(dst) != META:
                raise HostSync(f"aten::{name} copies device memory to {dst} at {_where()}")
        return func(*args, **kwargs)


def _trainer(tiny_recipe: Path, tmp_path: Path, name: str, extra: list[str] = (),
             request: pytest.FixtureRequest | None = None) -> Trainer:
    """The conformance test's one-step recipe for method ``name``, on the meta device."""
    cls = registry().get("method", name)
    overrides = [f"method.name={name!r}", "schedule.epochs=1", "data.limit=16", "schedule.batch_size=8",
                 "attack.steps=2", "engine.device='meta'", "engine.precision='fp32'"]
    overrides += [f"method.{k}=2" for k in ("n_views", "eval_views") if k in cls.Options.__dataclass_fields__]
    overrides += teacher_overrides(cls, request) if request is not None else []
    if not cls.needs_attack:
        overrides.append("attack.name='none'")
    overrides += tiny_backbone(cls)
    return Trainer(load(tiny_recipe, overrides + list(extra)), tmp_path / name, quiet=True)


def _run_steps(trainer: Trainer, steps: int = 2) -> None:
    """``steps`` engine steps (LR, forward with the attack, backward, clipping, optimizer, method hook); the first one
    creates lazy state (optimizer buffers, free AT's δ) and is checked as well."""
    images, labels = trainer.train.images[:8].to(META), trainer.train.labels[:8].to(META)
    trainer.method.train()
    trainer.method.on_epoch_start(1, 1)
    with SyncDetector():
        for i in range(steps):
            for rep in range(trainer.replays):
                trainer._step(1, i, rep, images, labels)


def test_the_detector_catches_reads_of_device_memory() -> None:
    x = torch.zeros(4, 4, device=META)
    for read in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: x[x > 0], lambda: x.nonzero(),
                 lambda: x.cpu(), lambda: x.masked_select(x > 0)):
        with pytest.raises(HostSync), SyncDetector():
            read()
    with SyncDetector():  # gathers, torch.where and host-side scalars are fine
        x.gather(1, torch.zeros(4, 1, dtype=torch.long, device=META))
        torch.where(x > 0, x, -x)
        assert torch.tensor(3.0).item() == 3.0


@pytest.mark.parametrize("name", registry().names("method"))
def test_every_method_steps_without_a_host_sync(name: str, tiny_recipe: Path, tmp_path: Path,
                                                request: pytest.FixtureRequest) -> None:
    _run_steps(_trainer(tiny_recipe, tmp_path, name, request=request))


@pytest.mark.parametrize("name, extra", [
    ("acl", ["method.variant='a2s'"]),
    ("acl", ["optimizer.name='lars'", "engine.grad_clip=1.0"]),
    ("acl", ["optimizer.name='adam'", "attack.norm='l2'"]),
    ("dynacl", ["method.momentum_encoder=true"]),
    ("air", ["method.kl_impl='reference'"]),
    ("simclr_adv", ["method.training='free'", "method.replays=2"]),
    ("simclr_adv", ["method.leak_attack_grads=true"]),
    ("empssl_adv", ["method.training='free'"]),
    ("sat", ["attack.random_start=false", "attack.norm='l2'"]),
    ("mae", ["attack.name='pgd'", "method.contrastive_weight=0.5", "encoder.head_layers=1"]),
    ("mae", ["method.adpe='coordinate'", "method.adpe_update='ascent'", "method.adpe_persistent=true"]),
    ("mae", ["method.adpe='embedding'", "method.adpe_update='ascent'"]),
    ("mae", ["method.adpe='coordinate'", "method.adpe_norm='l2'"]),
    ("mae", ["method.adpe='embedding'", "method.adpe_norm='linf'", "method.adpe_shared=false"]),
    ("adios", ["method.form='byol'", "method.update='simultaneous'"]),
])
def test_method_variants_step_without_a_host_sync(name: str, extra: list[str], tiny_recipe: Path,
                                                  tmp_path: Path) -> None:
    _run_steps(_trainer(tiny_recipe, tmp_path, name, extra))


def test_an_epoch_reads_metrics_back_only_every_log_every_steps(tiny_recipe: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop around the steps (batches, LR, progress) reads nothing back either; the one read is ``_flush``."""
    trainer = _trainer(tiny_recipe, tmp_path, "acl", ["data.limit=48", "engine.log_every=2"])  # 6 steps
    flushed: list[int] = []

    def flush(pending: list, epoch: int, log: Any) -> list[float]:
        flushed.append(len(pending))
        return [0.0] * len(pending)

    monkeypatch.setattr(trainer, "_flush", flush)
    from rsslctl.run.logs import LoggingOptions, RunLogger
    trainer._t_run, trainer._steps_at_start = 0.0, 0  # what fit() sets up before its epochs
    trainer.logger = RunLogger(tmp_path, LoggingOptions(tensorboard=False, csv=False), {}, quiet=True)
    images, labels = trainer.train.images.to(META), trainer.train.labels.to(META)
    with open(tmp_path / "log.jsonl", "w") as log, SyncDetector():
        trainer._epoch(1, images, labels, log, lambda n, info=None: None)
    assert flushed == [2, 2, 2]


def test_a_streamed_epoch_reads_nothing_back(tiny_recipe: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed path (host batches copied to the device ahead of use) keeps the epoch free of reads as well."""
    from rsslctl.data.stream import StreamSplit, on_device
    trainer = _trainer(tiny_recipe, tmp_path, "acl", ["data.limit=48", "engine.log_every=3", "data.stream='on'",
                                                      "data.workers=0"])
    assert isinstance(trainer.train, StreamSplit)
    flushed: list[int] = []
    monkeypatch.setattr(trainer, "_flush",
                        lambda pending, epoch, log: flushed.append(len(pending)) or [0.0] * len(pending))
    from rsslctl.run.logs import LoggingOptions, RunLogger
    trainer._t_run, trainer._steps_at_start = 0.0, 0
    trainer.logger = RunLogger(tmp_path, LoggingOptions(tensorboard=False, csv=False), {}, quiet=True)
    images, labels = on_device(trainer.train, META)
    with open(tmp_path / "log.jsonl", "w") as log, SyncDetector():
        trainer._epoch(1, images, labels, log, lambda n, info=None: None)
    assert flushed == [3, 3]
