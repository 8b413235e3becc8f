"""The multi-task paper's protocol pieces: exponential LR decay, transfer fine-tuning to another dataset with a label
fraction, FGSM as ALF's training attack, the random-init (no pretraining) baseline, and their CLI validation."""
from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from rsslctl import hookimpl
from rsslctl.base import registry
from rsslctl.base.errors import UserError
from rsslctl.cli import main
from rsslctl.data.dataset import ImageData
from rsslctl.nn.optim import ScheduleOptions, lr_at
from rsslctl.run.recipe import load
from rsslctl.runtime.checkpoint import latest_checkpoint, load_checkpoint
from rsslctl_plugins.datasets.digits import Digits


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_exponential_schedule_decays_geometrically_from_lr_to_min_lr() -> None:
    s = ScheduleOptions(kind="exponential", min_lr=1e-3, scheduler_step="after")
    lrs = [lr_at(i, 100, 0, 0.1, s) for i in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[100] == pytest.approx(1e-3)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert all(r == pytest.approx((1e-3 / 0.1) ** (1 / 100)) for r in ratios)  # one constant factor per step
    assert lr_at(50, 100, 0, 0.1, s) == pytest.approx(math.sqrt(0.1 * 1e-3))
    warm = [lr_at(i, 100, 10, 0.1, s) for i in range(12)]
    assert warm[9] == pytest.approx(0.1) and warm[11] < warm[10] <= 0.1  # warm-up, then decay


def test_exponential_schedule_refuses_a_zero_min_lr(tiny_recipe: Path) -> None:
    with pytest.raises(UserError, match="schedule.min_lr = 0 with kind = \"exponential\""):
        load(tiny_recipe, ["schedule.kind='exponential'", "schedule.min_lr=0"])


class FiveDigits(Digits):
    """A different, smaller downstream task: the digits 0-4 only, mirrored (5 classes)."""

    name = "five_digits"

    def load(self, split: str) -> ImageData:
        data = super().load(split)
        keep = (data.labels < 5).nonzero().flatten()
        return ImageData(data.images[keep].flip(3).contiguous(), data.labels[keep], data.classes[:5], self.name)


@pytest.fixture
def five_digits():
    plugin = types.ModuleType("test_five_digits")
    plugin.rsslctl_datasets = hookimpl(lambda: [FiveDigits])
    registry.registry().register(plugin)
    yield
    registry.registry().unregister(plugin)


COMMON = ["--epochs", "1", "--batch-size", "32", "--test-limit", "32", "--eps-curve", "", "--pgd-steps", "1",
          "--quiet"]


def test_transfer_alf_with_fgsm_on_a_label_fraction_of_another_dataset(tiny_recipe: Path, tmp_path: Path,
                                                                        five_digits) -> None:
    run_dir = tmp_path / "run"
    assert run("pretrain", str(tiny_recipe), "--run-dir", str(run_dir), "--quiet", "--set", "schedule.epochs=1",
               "--set", "method.name='simclr'", "--set", "attack.name='none'").exit_code == 0
    result = run("finetune", str(run_dir), "--mode", "ALF", "--dataset", "five_digits", "--label-fraction", "0.1",
                 "--train-attack", "fgsm", "--json", *COMMON)
    assert result.exit_code == 0, result.output
    info = json.loads((run_dir / "finetune" / "ALF" / "config.json").read_text())
    n_train = len(FiveDigits(None, Path(".")).load("train"))
    assert info["num_classes"] == 5 and info["data"]["name"] == "five_digits"
    assert info["train_images"] == round(0.1 * n_train) and info["config"]["attack"] == "fgsm"
    report = json.loads(result.stdout)
    assert "accuracy" in report["modes"]["ALF"]["fgsm"]  # evaluated with FGSM

    # the no-pretraining baseline: same architecture, random weights (not the run's), seeded
    outs = [tmp_path / "rand_a", tmp_path / "rand_b"]
    for out in outs:
        result = run("finetune", str(run_dir), "--random-init", "--out", str(out), "--mode", "SLF", "--dataset",
                     "five_digits", "--no-evaluate", *COMMON)
        assert result.exit_code == 0, result.output
    a, b = (load_file(str(o / "finetune" / "SLF" / "model.safetensors")) for o in outs)
    pretrained = load_checkpoint(latest_checkpoint(run_dir))[0]
    key = next(k for k in a if k.startswith("body.backbone.") and k.endswith("conv1.weight"))
    assert torch.equal(a[key], b[key])
    assert not torch.equal(a[key], pretrained["encoder.backbone." + key[len("body.backbone."):]])
    assert "random init" in json.loads((outs[0] / "finetune" / "SLF" / "config.json").read_text())["source"]


@pytest.mark.parametrize("args, message", [
    (["--mode", "ALF", "--train-attack", "fgsn"], "--train-attack: unknown attack 'fgsn' (did you mean 'fgsm'?)"),
    (["--mode", "SLF", "--train-attack", "fgsm"], "--train-attack: SLF has no training attack"),
    (["--random-init", "--weights", "w.safetensors", "--out", "x"], "--random-init trains from random weights"),
    (["--random-init", "--timm", "resnet18"], "--random-init --timm MODEL needs --out DIR"),
    (["--random-init", "--out", "x"], "--random-init needs the architecture: pass RUN_DIR or --timm MODEL"),
])
def test_protocol_flags_are_validated_in_one_line(tiny_recipe: Path, tmp_path: Path, args: list[str],
                                                  message: str) -> None:
    run_dir = tmp_path / "run"  # never read: the flags are checked before the run is loaded
    target = [] if {"--weights", "--timm", "--out"} & set(args) else [str(run_dir)]
    result = run("finetune", *target, *args, "--no-evaluate", "--quiet")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
