"""Shared fixtures: a tiny recipe (digits at 16 px, narrow ResNet-18) that trains in seconds on CPU."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

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


#: the sizes of the tiny backbones: TINY's narrow ResNet-18 and a one-block ViT on 16 px images in 4 px patches
TINY_RESNET_SIZE = "backbone.model_kwargs={channels=[8, 16, 16, 16]}"
TINY_VIT_SIZE = "backbone.model_kwargs={img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2}"

#: overrides giving TINY a backbone of the kind a method declares (``Method.backbone_kind``); "any" keeps the ResNet
TINY_BACKBONES = {"any": [],
                  "vit": ["backbone.model='vit_tiny_patch16_224'", "backbone.cifar_stem=false", TINY_VIT_SIZE]}


def tiny_backbone(method_cls: type, shipped: bool = False) -> list[str]:
    """The TINY overrides for ``method_cls``'s backbone kind. ``shipped``: the sizes alone, for a shipped recipe,
    which names its own (full-size) backbone model."""
    if shipped:
        return [TINY_VIT_SIZE if method_cls.backbone_kind == "vit" else TINY_RESNET_SIZE]
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


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run pretrained through the CLI (one epoch of 64 digits), one per test module: the modules that
    interrupt or lock fine-tuning and evaluation write beside its checkpoint, never into another module's run."""
    from cli_helpers import run
    root = tmp_path_factory.mktemp("pretrained")
    (root / "tiny.toml").write_text(TINY)
    out = root / "run"
    result = run("pretrain", str(root / "tiny.toml"), "--run-dir", str(out), "--quiet", "--set", "schedule.epochs=1",
                 "--set", "schedule.warmup_epochs=0", "--set", "data.limit=64")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny simclr run (one epoch of two steps): the teacher of two-stage methods (DeACL, AdvCL)."""
    from rsslctl.run.directory import prepare_run_dir
    from rsslctl.run.recipe import load
    from rsslctl.train.engine import Trainer
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


# -- state dicts ---------------------------------------------------------------------------------------------------
def assert_same_tensors(a: Mapping[str, Any], b: Mapping[str, Any], what: str = "") -> None:
    """``a`` and ``b`` (state dicts, checkpoint tensors) hold the same keys and, key by key, tensors of the same dtype
    and shape with exactly the same values; the message names the first key that differs."""
    import torch
    where = f"{what}: " if what else ""
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    assert not missing and not extra, f"{where}keys differ: only in the first {missing}, only in the second {extra}"
    for key in a:
        x, y = a[key], b[key]
        assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor), f"{where}{key}: not two tensors"
        assert x.dtype == y.dtype, f"{where}{key}: dtype {x.dtype} != {y.dtype}"
        assert x.shape == y.shape, f"{where}{key}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        same = (x == y) | (x.isnan() & y.isnan()) if x.is_floating_point() or x.is_complex() else x == y
        if not bool(same.all()):  # NaN where both hold NaN counts as the same value
            raise AssertionError(f"{where}{key}: {int((~same).sum())} of {x.numel()} values differ")


def final_checkpoint(run_dir: Path) -> tuple[dict, dict, dict]:
    """(model tensors, state tensors, meta) of the newest checkpoint of ``run_dir``."""
    from rsslctl.runtime.checkpoint import latest_checkpoint, load_checkpoint
    return load_checkpoint(latest_checkpoint(run_dir))


def same_final_checkpoints(a: Path, b: Path, state_prefix: str | None = None) -> None:
    """The newest checkpoints of runs ``a`` and ``b`` hold the same weights, and the same state tensors whose keys
    start with ``state_prefix`` (when given)."""
    (wa, sa, _), (wb, sb, _) = final_checkpoint(a), final_checkpoint(b)
    assert_same_tensors(wa, wb, "model")
    if state_prefix is not None:
        assert_same_tensors({k: v for k, v in sa.items() if k.startswith(state_prefix)},
                            {k: v for k, v in sb.items() if k.startswith(state_prefix)}, "state")


# -- kill and resume -------------------------------------------------------------------------------------------------
class Killed(Exception):
    """Raised from the engine's ``on_step`` hook: the run stops as a kill stops it, with the checkpoints written so
    far and nothing else."""


def train_run(recipe: Any, run_dir: Path, on_step: Callable[[int], None] | None = None) -> Any:
    """A new run of the loaded ``recipe`` in ``run_dir`` (built first, then the directory written, as the CLI does);
    the trainer after ``fit``."""
    from rsslctl.run.directory import prepare_run_dir
    from rsslctl.train.engine import Trainer
    trainer = Trainer(recipe, run_dir, quiet=True, on_step=on_step)
    prepare_run_dir(recipe, run_dir, force=False)
    trainer.fit()
    return trainer


def kill_and_resume(recipe: Any, run_dir: Path, kill_at: int, reference: Path | None = None,
                    before_resume: Callable[[Path], None] | None = None, state_prefix: str | None = None) -> Any:
    """Train ``recipe`` into ``run_dir``, killed right after optimizer step ``kill_at``; ``before_resume(run_dir)``;
    resume it with its saved recipe.toml, as ``rsslctl pretrain --resume`` does. With ``reference`` (an uninterrupted
    run's directory) the final checkpoints must be identical (``same_final_checkpoints``). The resumed trainer."""
    from rsslctl.run.directory import load_run_recipe
    from rsslctl.train.engine import Trainer

    def kill(step: int) -> None:
        if step == kill_at:
            raise Killed

    with pytest.raises(Killed):
        train_run(recipe, run_dir, on_step=kill)
    if before_resume is not None:
        before_resume(run_dir)
    trainer = Trainer(load_run_recipe(run_dir), run_dir, quiet=True)
    trainer.fit(resume=True)
    if reference is not None:
        same_final_checkpoints(reference, run_dir, state_prefix)
    return trainer


def sigkill_and_resume(pretrain: list[str], run_dir: Path, before_resume: Callable[[Path], None] | None = None,
                       timeout: float = 120) -> None:
    """``rsslctl pretrain PRETRAIN… --run-dir RUN_DIR --quiet`` in a process SIGKILLed as soon as its first checkpoint
    exists (which must be before its last), ``before_resume(run_dir)``, then ``rsslctl pretrain --resume RUN_DIR``."""
    from rsslctl.runtime.checkpoint import latest_checkpoint, read_meta
    cli = [sys.executable, "-m", "rsslctl.cli", "pretrain"]
    proc = subprocess.Popen(cli + pretrain + ["--run-dir", str(run_dir), "--quiet"])
    deadline = time.time() + timeout
    while latest_checkpoint(run_dir) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill landed"
    last = latest_checkpoint(run_dir)
    assert last is not None, "no checkpoint was written before the kill"
    epochs = read_meta(last)["recipe"]["schedule"]["epochs"]
    assert last.name != f"epoch-{epochs:04d}", "the kill landed after the last checkpoint"
    if before_resume is not None:
        before_resume(run_dir)
    subprocess.run(cli + ["--resume", str(run_dir), "--quiet"], check=True, timeout=timeout)
