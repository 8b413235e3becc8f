"""The CUDA code path, exercised on a machine without a GPU through ``FakeTensorMode``.

Fake tensors carry a device, shape and dtype but no data, so a CPU-only build can run the forward code of a CUDA step
with tensors on ``cuda:0``: an op that mixes a CUDA tensor with a CPU tensor (other than a 0-dim scalar) raises a
device mismatch exactly as a GPU would, and a read of device data (``.item()``, ``bool()``, a boolean mask) raises
``DataDependentOutputException`` / ``DynamicOutputShapeException`` instead of silently syncing. bf16 autocast on
"cuda" applies to fake CUDA tensors once ``torch.autocast`` is allowed to switch it on (it checks for a GPU).

What it cannot run, and how these tests get around it:

* **backward**: the autograd engine asks the CUDA driver for a primary context of cuda:0 and fails
  (``hasPrimaryContext expects a valid device index``), for ``loss.backward()``, ``torch.autograd.grad``,
  ``torch.func.grad``/``vjp``, ``make_fx`` and AOTAutograd alike. The tests therefore run forward code only, with
  ``torch.autograd.grad`` replaced by zeros of the inputs' shape and device, so that every attack runs its loop of
  forward passes, projections and steps (zero gradients: the step's values are meaningless, its devices are not);
* **host-side values**: under the mode *every* new tensor is fake, host ones too, so code that reads a CPU tensor it
  just computed (kornia's random parameters, its Gaussian blur's sigma check) would fail although that is no host
  sync on a GPU. kornia's parameter draws run outside the mode (real CPU tensors, moved to the device as in a real
  run), and the Gaussian blur's kernel is skipped (its host-side check reads sigma); the blur stays covered by the
  meta-device sync test (tests/train/test_sync.py) and by the real-GPU tests;
* **deepcopy and swapping of fake parameters**: methods are built for real on the CPU and their parameters and
  buffers then replaced by fake CUDA copies (channels_last kept); ``Module.to("cuda")`` of a real module is not
  used. A teacher's checkpoint is likewise read for real on the CPU (its finiteness check reads values) and then
  faked. AdvCL's one-off k-means fit in ``prepare`` (scikit-learn on the teacher's features) gets random centroids.

So a test here passing means: the method's training-step forward (augmentation, attack loop, losses), the attacks,
and the evaluation forward create nothing on the wrong device and read nothing back from the GPU, in bf16 autocast.
"""
from __future__ import annotations

import contextlib
import traceback
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import pytest
import torch
from cli_helpers import TinyLinear
from conftest import teacher_overrides, tiny_backbone
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode, unset_fake_temporarily

from rsslctl.base.options import validate
from rsslctl.base.registry import registry
from rsslctl.data.augment import AugmentOptions, ViewAugment
from rsslctl.run.build import autocast, build_method
from rsslctl.run.recipe import load
from rsslctl.run.teacher import FrozenTeacher
from rsslctl.train.classify import Classifier, accuracy, extract_features

CUDA = torch.device("cuda")
DeviceMismatch = torch._subclasses.fake_tensor.FakeTensorDeviceMismatchError


def _zero_grads(outputs: Any, inputs: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """Stands in for ``torch.autograd.grad`` (the engine needs a real CUDA context): zeros like the inputs."""
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    return tuple(torch.zeros_like(i) for i in inputs)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTensorMode]:
    """A fake-CUDA world: a FakeTensorMode (entered by the test), forward-only gradients, bf16 autocast allowed on
    "cuda", kornia's host-side random parameters drawn for real."""
    import kornia.augmentation as K
    import kornia.augmentation.base as KB

    monkeypatch.setattr(torch.autograd, "grad", _zero_grads)
    real_autocast = torch.autocast

    def gpu_autocast(*args: Any, **kwargs: Any) -> torch.autocast:
        # torch.autocast switches itself off without a GPU; claiming one only while it is built keeps every other
        # CUDA check (e.g. what a boolean mask triggers) as it is on this machine
        with mock.patch.object(torch.cuda, "is_available", lambda: True), \
                mock.patch.object(torch.cuda, "is_bf16_supported", lambda *a, **k: True):
            return real_autocast(*args, **kwargs)
    monkeypatch.setattr(torch, "autocast", gpu_autocast)
    draw = KB._BasicAugmentationBase.forward_parameters

    def host_parameters(self: Any, batch_shape: torch.Size) -> dict:
        with unset_fake_temporarily():
            return draw(self, batch_shape)
    monkeypatch.setattr(KB._BasicAugmentationBase, "forward_parameters", host_parameters)
    monkeypatch.setattr(K.RandomGaussianBlur, "apply_transform", lambda self, x, *a, **k: x.clone())
    yield FakeTensorMode(allow_non_fake_inputs=True)


def to_fake_cuda(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Every parameter and buffer of ``module`` replaced by a fake copy on cuda:0 (shared ones stay shared)."""
    done: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            f = mode.from_tensor(t.detach())
            with mode:
                f = f.to(CUDA)
            done[id(t)] = nn.Parameter(f, t.requires_grad) if isinstance(t, nn.Parameter) else f
        return done[id(t)]
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None:
                m._parameters[k] = fake(p)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = fake(b)
    return module


def bf16() -> contextlib.AbstractContextManager:
    return autocast(CUDA, "bf16")


def _images(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=CUDA),
            torch.randint(0, 10, (n,), device=CUDA))


def test_the_fake_world_catches_what_a_gpu_would(fake_cuda: FakeTensorMode) -> None:
    """The harness can fail: a CPU tensor inside a CUDA step and a read of device data both raise."""
    with fake_cuda:
        x = torch.randn(4, 3, device=CUDA)
        with pytest.raises(DeviceMismatch):
            x + torch.ones(4, 3)  # created on the CPU inside the step
        with pytest.raises(DataDependentOutputException):
            x.sum().item()
        with pytest.raises(Exception, match="nonzero"):
            x[x > 0]
        assert (x + torch.tensor(2.0)).device.type == "cuda"  # CPU scalars are fine, as on a GPU
        with bf16():
            assert (x @ torch.randn(3, 2, device=CUDA)).dtype == torch.bfloat16


@pytest.mark.parametrize("name", registry().names("method"))
def test_every_method_training_step_forward_on_fake_cuda(name: str, tiny_recipe: Path, fake_cuda: FakeTensorMode,
                                                         request: pytest.FixtureRequest) -> None:
    _training_step_forward(name, [], tiny_recipe, fake_cuda, request)


@pytest.mark.slow  # ~20 s together on the 2-core CI machine; the registry-wide test above runs by default
@pytest.mark.parametrize("name, extra", [
    ("acl", ["method.variant='a2s'"]),
    ("dynacl", ["method.momentum_encoder=true"]),
    ("simclr_adv", ["method.training='free'", "method.replays=2"]),
    ("empssl_adv", ["method.training='free'"]),
    ("sat", ["attack.random_start=false", "attack.norm='l2'"]),
    ("mae", ["attack.name='pgd'", "method.contrastive_weight=0.5", "encoder.head_layers=1"]),
    ("mae", ["method.adpe='coordinate'", "method.adpe_update='ascent'", "method.adpe_persistent=true"]),
    ("mae", ["method.adpe='coordinate'", "method.adpe_norm='l2'"]),
    ("mae", ["method.adpe='embedding'", "method.adpe_norm='linf'"]),
    ("adios", ["method.form='byol'", "method.update='simultaneous'"]),
])
def test_method_variants_forward_on_fake_cuda(name: str, extra: list[str], tiny_recipe: Path,
                                              fake_cuda: FakeTensorMode, request: pytest.FixtureRequest) -> None:
    _training_step_forward(name, extra, tiny_recipe, fake_cuda, request)


def _training_step_forward(name: str, extra: list[str], tiny_recipe: Path, fake_cuda: FakeTensorMode,
                           request: pytest.FixtureRequest) -> None:
    cls = registry().get("method", name)
    overrides = [f"method.name={name!r}", "schedule.epochs=1", "data.limit=16", "schedule.batch_size=8",
                 "attack.steps=2", "engine.channels_last=true"]
    overrides += [f"method.{k}=2" for k in ("n_views", "eval_views") if k in cls.Options.__dataclass_fields__]
    overrides += teacher_overrides(cls, request)
    if not cls.needs_attack:
        overrides.append("attack.name='none'")
    overrides += tiny_backbone(cls)
    recipe = load(tiny_recipe, overrides + extra)
    torch.manual_seed(0)
    method = to_fake_cuda(build_method(recipe, torch.device("cpu")), fake_cuda)
    for teacher in [v for v in vars(method).values() if isinstance(v, FrozenTeacher)]:
        to_fake_cuda(teacher.load(torch.device("cpu")), fake_cuda)  # read from disk for real, then faked
    if hasattr(method, "fit_centroids"):  # AdvCL: k-means (scikit-learn on host values, once in prepare) → random

        def fit_centroids(feats: torch.Tensor) -> list[torch.Tensor]:
            with unset_fake_temporarily():
                return [torch.randn(min(k, len(feats)), feats.shape[1]) for k in method.options.clusters]
        method.fit_centroids = fit_centroids
    method.train()
    method.on_epoch_start(1, 1)  # host-side schedules (augmentation strength, ...), outside the step
    with fake_cuda:
        images, labels = _images()
        method.prepare(images, 2)
        with bf16():
            loss, metrics = method.training_step(images, labels)
        assert loss.device.type == "cuda" and loss.dim() == 0
        assert all(v.device.type == "cuda" for v in metrics.values()), {k: v.device for k, v in metrics.items()}
        method.eval()
        with torch.no_grad(), bf16():
            feats = method.eval_features(images[:2].float() / 255, "normal")
        assert feats.device.type == "cuda" and feats.shape[0] == 2


def test_augmentation_on_fake_cuda(fake_cuda: FakeTensorMode) -> None:
    augment = ViewAugment(12, AugmentOptions())
    with fake_cuda:
        images, _ = _images()
        views = augment(images)
    assert views.device.type == "cuda" and views.dtype == torch.float32 and views.shape == (8, 3, 12, 12)


@pytest.mark.parametrize("name", registry().names("attack"))
def test_every_attack_forward_on_fake_cuda(name: str, fake_cuda: FakeTensorMode) -> None:
    cls = registry().get("attack", name)
    attack = cls(validate(cls.Options, {}, "attack"))
    torch.manual_seed(1)
    model = to_fake_cuda(TinyLinear(), fake_cuda)
    with fake_cuda:
        x = torch.rand(16, 3, 8, 8, device=CUDA)
        y = torch.randint(0, 10, (16,), device=CUDA)
        with bf16():
            adv = attack.perturb(x, lambda xa: torch.nn.functional.cross_entropy(model(xa), y))
    assert adv.device.type == "cuda" and adv.shape == x.shape and adv.dtype == x.dtype


def test_evaluation_forward_on_fake_cuda(tiny_recipe: Path, fake_cuda: FakeTensorMode) -> None:
    """Feature extraction and the robust-accuracy loop run on the device; the loop's only read of device data is the
    final count (``float(correct)``, once per evaluation, by design)."""
    recipe = load(tiny_recipe, ["attack.steps=2"])
    torch.manual_seed(0)
    method = to_fake_cuda(build_method(recipe, torch.device("cpu")), fake_cuda)
    attack = recipe.attack.build()
    with fake_cuda:
        images, labels = _images()
        feats = extract_features(method, lambda x: method.eval_features(x, "normal"), images, CUDA, "bf16")
        assert feats.device.type == "cuda" and feats.dtype == torch.float32 and feats.shape[0] == 8
    model = Classifier(method.eval_encoder(), lambda x, r: method.eval_features(x, r), feats.shape[1], 10,
                       route="normal")
    to_fake_cuda(model.head, fake_cuda)
    with fake_cuda:
        with pytest.raises(DataDependentOutputException) as err:
            accuracy(model, images, labels, CUDA, attack)
    ours = [f for f in traceback.extract_tb(err.value.__traceback__) if f.filename.endswith("classify.py")]
    assert ours[-1].line.strip() == "return float(correct) / len(labels)"
