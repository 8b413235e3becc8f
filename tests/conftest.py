"""Shared fixtures: a tiny recipe (digits at 16 px, narrow ResNet-18) that trains in seconds on CPU."""
from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Callable, Iterator

import pytest

from rsslctl import hookimpl
from rsslctl.base import registry

os.environ.setdefault("COLUMNS", "200")  # rich tables unwrapped in captured output

TINY = """
[run]
name = "tiny"
seed = 3

[data]
name = "digits"
image_size = 16
limit = 96

[backbone]
name = "timm"
model = "resnet18"
model_kwargs = { channels = [8, 16, 16, 16] }

[encoder]
head_layers = 2
head_dim = 32

[method]
name = "acl"

[attack]
name = "pgd"
steps = 1

[optimizer]
name = "sgd"
lr = 0.05

[schedule]
epochs = 3
batch_size = 32
warmup_epochs = 1

[engine]
device = "cpu"
log_every = 2

[evaluation]
epochs = 30
lr = 0.05
steps = 2
limit = 64
"""


#: overrides giving TINY a backbone of the kind a method declares (``Method.backbone_kind``); "any" keeps the ResNet
TINY_BACKBONES = {"any": [],
                  "vit": ["backbone.model='vit_tiny_patch16_224'", "backbone.cifar_stem=false",
                          "backbone.model_kwargs={img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2}"]}


def tiny_backbone(method_cls: type) -> list[str]:
    """The TINY overrides for ``method_cls``'s backbone kind."""
    return list(TINY_BACKBONES[method_cls.backbone_kind])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped, with the reason, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace('name = "tiny"', 'name = "tiny"\noutput_dir = "' + str(tmp_path / "runs") + '"'))
    return path


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny simclr run (one epoch of two steps): the teacher of two-stage methods (DeACL, AdvCL)."""
    from rsslctl.train.engine import Trainer
    from rsslctl.run.recipe import load
    from rsslctl.run.directory import prepare_run_dir
    root = tmp_path_factory.mktemp("teacher")
    (root / "tiny.toml").write_text(TINY)
    recipe = load(root / "tiny.toml", ["method.name='simclr'", "attack.name='none'", "schedule.epochs=1",
                                       "data.limit=16", "schedule.batch_size=8"])
    run = root / "simclr"
    prepare_run_dir(recipe, run, force=False)
    Trainer(recipe, run, quiet=True).fit()
    return run


def teacher_overrides(cls: type, request: pytest.FixtureRequest) -> list[str]:
    """``method.teacher=<tiny simclr run>`` for a method with a teacher option, else nothing."""
    if "teacher" not in cls.Options.__dataclass_fields__:
        return []
    return [f"method.teacher={str(request.getfixturevalue('teacher_run'))!r}"]


@pytest.fixture
def register_methods() -> Iterator[Callable[..., None]]:
    """Register method classes in the process-wide registry for one test, and remove them afterwards."""
    added: list[types.ModuleType] = []

    def register(*classes: type) -> None:
        plugin = types.ModuleType(f"test_plugin_{len(added)}")
        plugin.rsslctl_methods = hookimpl(lambda: list(classes))
        registry.registry().register(plugin)
        added.append(plugin)

    yield register
    for plugin in added:
        registry.registry().unregister(plugin)


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """A run with ``engine.threads`` sets torch's process-wide thread count; restore it after each test, so a later
    test's in-process run does not sum floats in another order than its subprocess twin."""
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
