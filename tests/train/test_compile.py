"""engine.compile: the compiled training step computes what the eager one does, with only the documented graph breaks.

Compiling takes long on a 2-core CPU, so these tests use a two-conv backbone (registered here like a plugin) and
AOTAutograd without code generation (``aot_eager``): dynamo's capture, the graph breaks and the compiled backward are
exercised, inductor's C++ code generation only by the test marked ``slow`` (``pytest -m slow``).
"""
from __future__ import annotations

import dataclasses
import functools
import types
from pathlib import Path
from typing import Iterator

import pytest
import torch
from conftest import teacher_overrides, tiny_backbone
from torch import nn

import rsslctl.train.engine
from rsslctl import hookimpl
from rsslctl.base import registry
from rsslctl.base.errors import UserError
from rsslctl.base.options import opt
from rsslctl.nn.encoder import Backbone
from rsslctl.run.build import compile_step
from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load
from rsslctl.train.engine import Trainer


@dataclasses.dataclass
class _TwoConvOptions:  # the tiny recipe's [backbone] keys, ignored
    model: str = opt("", "ignored")
    model_kwargs: dict = opt({}, "ignored")


class TwoConv(Backbone):
    """Conv-BN-ReLU ×2 and global pooling: a backbone dynamo traces in a second."""

    name = "two_conv"
    Options = _TwoConvOptions

    def build(self) -> nn.Module:
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net.num_features = 16
        return net


@pytest.fixture(autouse=True)
def two_conv() -> Iterator[None]:
    plugin = types.ModuleType("test_two_conv")
    plugin.rsslctl_backbones = hookimpl(lambda: [TwoConv])
    registry.registry().register(plugin)
    torch._dynamo.reset()
    yield
    registry.registry().unregister(plugin)
    torch._dynamo.reset()


def _recipe(tiny_recipe: Path, name: str, extra: list[str] = (), request: pytest.FixtureRequest | None = None):
    cls = registry.registry().get("method", name)
    overrides = [f"method.name={name!r}", "data.limit=32", "schedule.batch_size=8", "schedule.epochs=1",
                 "attack.steps=2", "engine.precision='fp32'"]
    overrides += tiny_backbone(cls) or ["backbone.name='two_conv'"]  # a ViT-only method keeps its tiny ViT
    overrides += [f"method.{k}=2" for k in ("n_views", "eval_views") if k in cls.Options.__dataclass_fields__]
    overrides += teacher_overrides(cls, request) if request is not None else []
    if not cls.needs_attack:
        overrides.append("attack.name='none'")
    return load(tiny_recipe, overrides + list(extra))


def _steps(trainer: Trainer, step, n: int = 2) -> list[torch.Tensor]:
    """``n`` steps the way the engine takes them, from a fixed RNG state; returns the losses."""
    images, labels = trainer.train.images[:8], trainer.train.labels[:8]
    trainer.method.train()
    trainer.method.on_epoch_start(1, 1)
    torch.manual_seed(0)
    losses = []
    for _ in range(n):
        loss, _ = step(images, labels)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        trainer.method.after_optimizer_step()
        losses.append(loss.detach())
    return losses


#: attack in eval mode on two BN routes; attack in train mode on one view; a classification task. Every other
#: registered method runs with ``pytest -m slow`` (about 10 s each here).
FAST = ("acl", "simclr_adv", "sat")


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in registry.registry().names("method")])
def test_compiled_step_equals_eager_with_only_the_documented_graph_breaks(name: str, tiny_recipe: Path,
                                                                          tmp_path: Path,
                                                                          request: pytest.FixtureRequest) -> None:
    from torch._dynamo.utils import counters
    recipe = _recipe(tiny_recipe, name, request=request)
    eager, compiled = (Trainer(recipe, tmp_path / tag, quiet=True) for tag in ("eager", "compiled"))
    compiled.method.load_state_dict(eager.method.state_dict())
    counters.clear()
    want = _steps(eager, eager.method.training_step)
    got = _steps(compiled, compile_step(compiled.method, backend="aot_eager"))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for (key, a), b in zip(eager.method.state_dict().items(), compiled.method.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=key)
    breaks = {reason.split("\n")[0] for reason in counters["graph_break"]}
    assert breaks <= {"Skip inlining `torch.compiler.disable()`d function"}, breaks  # augmentation, attack loops
    assert counters["stats"]["unique_graphs"] >= 1


def test_trainer_with_compile_trains_like_the_eager_trainer(tiny_recipe: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole engine path (LR schedule, compiled step, backward, flushes, checkpoints) over 2 epochs."""
    monkeypatch.setattr(rsslctl.train.engine, "compile_step", functools.partial(compile_step, backend="aot_eager"))
    weights = {}
    for compile_ in (False, True):
        recipe = _recipe(tiny_recipe, "acl", ["schedule.epochs=2", f"engine.compile={str(compile_).lower()}"])
        run = tmp_path / str(compile_)
        trainer = Trainer(recipe, run, quiet=True)
        prepare_run_dir(recipe, run, force=False)
        trainer.fit()
        weights[compile_] = trainer.method.state_dict()
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_cuda_graphs_need_compile_on_cuda(tiny_recipe: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cuda_graphs needs engine.compile = true and a CUDA device"):
        Trainer(_recipe(tiny_recipe, "acl", ["engine.compile=true", "engine.cuda_graphs=true"]), tmp_path, quiet=True)


@pytest.mark.slow
def test_inductor_step_matches_eager(tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor's generated code (C++ on CPU); its own RNG is replaced by torch's so the streams match."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    recipe = _recipe(tiny_recipe, "acl")
    eager, compiled = (Trainer(recipe, tmp_path / tag, quiet=True) for tag in ("eager", "compiled"))
    compiled.method.load_state_dict(eager.method.state_dict())
    want = _steps(eager, eager.method.training_step)
    got = _steps(compiled, compile_step(compiled.method))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for (key, a), b in zip(eager.method.state_dict().items(), compiled.method.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3, msg=key)
