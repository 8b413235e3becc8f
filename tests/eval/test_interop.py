"""One tiny run end to end: evaluations kept per setting, `rsslctl compare` on it, and the exported classifier under
RobustBench's own ``clean_accuracy`` (skipped where the robustbench package is not installed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_user_error, run
from torch import nn

from rsslctl.eval import store

PROBE = ["--set", "evaluation.epochs=2", "--set", "evaluation.steps=1", "--set", "evaluation.limit=16"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretraining run (one epoch) with an SLF classifier evaluated on 16 test images."""
    from conftest import TINY
    root = tmp_path_factory.mktemp("interop")
    (root / "tiny.toml").write_text(TINY)
    run_dir = root / "run"
    assert run("pretrain", str(root / "tiny.toml"), "--run-dir", str(run_dir), "--quiet",
               "--set", "schedule.epochs=1").exit_code == 0
    result = run("finetune", str(run_dir), "--mode", "SLF", "--epochs", "1", "--batch-size", "32", "--pgd-steps", "1",
                 "--test-limit", "16", "--eps-curve", "0,8", "--set", "data.limit=64", "--quiet")
    assert result.exit_code == 0, result.output
    return run_dir


def test_evaluations_with_other_settings_are_kept_and_force_replaces_only_the_same(finetuned: Path) -> None:
    first = run("evaluate", str(finetuned), *PROBE, "--json")
    assert first.exit_code == 0, first.output
    knn = run("evaluate", str(finetuned), *PROBE, "--knn", "--json")  # another setting: no --force needed
    assert knn.exit_code == 0, knn.output
    a, b = json.loads(first.stdout), json.loads(knn.stdout)
    assert a["saved_to"] != b["saved_to"] and "knn" in b and "knn" not in a
    assert len(store.load_all(finetuned)) == 2
    assert_user_error(run("evaluate", str(finetuned), *PROBE, "--knn"), "already exists", "--force")
    assert json.loads(Path(b["saved_to"]).read_text())["knn"] == b["knn"]  # the refusal kept it
    again = run("evaluate", str(finetuned), *PROBE, "--force", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["saved_to"] == a["saved_to"]
    assert len(store.load_all(finetuned)) == 2 and Path(b["saved_to"]).is_file()

    rows = json.loads(run("compare", str(finetuned), "--format", "json").stdout)["rows"]
    assert sorted(r["evaluation"] for r in rows) == ["SLF", "probe", "probe"]
    slf = next(r for r in rows if r["evaluation"] == "SLF")
    clean = json.loads(next((finetuned / "evaluation").glob("*/SLF.json")).read_text())["clean_accuracy"]
    assert slf["figures"]["clean"]["mean"] == pytest.approx(100 * clean) and len(slf["eps_curve"]) == 2


def _robustbench_clean_accuracy():
    pytest.importorskip("pyautoattack")
    # robustbench 1.1.1 imports AutoAttack by its GitHub module name; its PyPI metadata installs the same code as
    # pyautoattack (and robustbench needs setuptools' pkg_resources, gone from setuptools >= 81)
    sys.modules.setdefault("autoattack", __import__("pyautoattack"))
    try:
        from robustbench.utils import clean_accuracy
    except ImportError as exc:
        pytest.skip(f"robustbench not importable ({exc}); pip install --no-deps robustbench")
    return clean_accuracy


def _exported_classifier(run_dir: Path, *export_flags: str) -> tuple[nn.Module, Any]:
    """The SLF classifier ``rsslctl export --classifier SLF`` writes, loaded the RobustBench way (its module's
    ``load_model``), and the run's test split."""
    assert run("export", str(run_dir), "--classifier", "SLF", *export_flags).exit_code == 0
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"rb_clf_{run_dir.name}", run_dir / "classifier_SLF.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from rsslctl.run.build import load_split
    from rsslctl.run.directory import load_run_recipe
    recipe = load_run_recipe(run_dir)
    test = load_split(recipe, recipe.data.test_split)
    return module.load_model(str(run_dir / "classifier_SLF.safetensors")), test


def test_exported_classifier_meets_the_robustbench_model_contract(finetuned: Path) -> None:
    clean_accuracy = _robustbench_clean_accuracy()
    model, test = _exported_classifier(finetuned)
    # RobustBench's contract: a plain nn.Module in eval mode; forward takes [0, 1] NCHW floats and returns logits
    assert isinstance(model, nn.Module) and not model.training

    x, y = test.images[:16].float().div(255), test.labels[:16]  # the 16 images `evaluate --test-limit 16` used
    x.requires_grad_(True)
    logits = model(x)
    assert logits.shape == (16, len(test.classes))
    logits.sum().backward()  # attacks need gradients with respect to the pixels
    assert x.grad is not None and x.grad.abs().sum() > 0
    from rsslctl.train.classify import load_classifier
    inside, _ = load_classifier(finetuned / "finetune" / "SLF", torch.device("cpu"))
    with torch.no_grad():  # normalisation inside: the same logits as rsslctl's own classifier on the same pixels
        assert torch.allclose(model(x.detach()), inside(x.detach()), atol=1e-5)
    ours = next(r for r in map(json.loads, map(Path.read_text, (finetuned / "evaluation").glob("*/SLF.json")))
                if r["test_images"] == 16)
    assert ours["test_images"] == 16
    assert clean_accuracy(model, x.detach(), y, batch_size=5, device=torch.device("cpu")) == ours["clean_accuracy"]


class _GitHubAutoAttack:
    """The AutoAttack interface robustbench 1.1.1 calls (fra31/auto-attack's: ``log_path=``, ``bs=``, the adversarial
    images returned), on pyautoattack, the package its metadata installs; the seed is rsslctl's (``--eval-seed 0``),
    where robustbench leaves it to the clock."""

    def __init__(self, model: nn.Module, norm: str, eps: float, version: str, device: torch.device,
                 log_path: str | None = None) -> None:
        from pyautoattack import AutoAttack
        self.attack = AutoAttack(model, norm=norm, eps=eps, version=version, device=device, seed=0)

    def run_standard_evaluation(self, x: torch.Tensor, y: torch.Tensor, bs: int, state_path=None) -> torch.Tensor:
        return self.attack.run_standard_evaluation(x, y, batch_size=bs, state_path=state_path)[0]


@pytest.mark.slow
def test_robustbench_benchmark_gives_rsslctls_autoattack_accuracy(finetuned: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """RobustBench's own ``benchmark`` (clean accuracy, standard AutoAttack, accuracy on its adversarial images) of
    the exported classifier on 8 test images gives what ``rsslctl evaluate --autoattack`` stores. ε = 1/255, so that
    some images survive and the two must agree on which (minutes on a CPU: every attack of the standard version
    runs on the survivors, twice)."""
    _robustbench_clean_accuracy()
    import robustbench.eval as rb_eval
    model, test = _exported_classifier(finetuned, "--force")
    x, y = test.images[:8].float().div(255), test.labels[:8]
    result = run("evaluate", str(finetuned), "--mode", "SLF", "--test-limit", "8", "--pgd-steps", "1", "--eps",
                 "1/255", "--eps-curve", "", "--autoattack")
    assert result.exit_code == 0, result.output
    [ours] = [r for r in map(json.loads, map(Path.read_text, (finetuned / "evaluation").glob("*/SLF.json")))
              if "autoattack" in r]
    monkeypatch.setattr(rb_eval, "load_clean_dataset", lambda *args, **kwargs: (x, y))  # its test data: our images
    monkeypatch.setattr(rb_eval, "AutoAttack", _GitHubAutoAttack)
    clean, robust = rb_eval.benchmark(model, n_examples=8, dataset="cifar10", threat_model="Linf", eps=1 / 255,
                                      batch_size=8, device=torch.device("cpu"))
    assert clean == pytest.approx(ours["clean_accuracy"]) and clean > 0
    assert robust == pytest.approx(ours["autoattack"]["robust_accuracy"]), (robust, ours["autoattack"])
    assert robust > 0


def test_a_single_folder_suite_result_still_loads_and_is_kept_when_other_settings_run(finetuned: Path) -> None:
    import shutil
    [folder] = [p.parent for p in (finetuned / "evaluation").glob("*/SLF.json")]
    legacy = finetuned / "evaluation" / "SLF.json"  # where runs of the previous layout hold it
    shutil.move(folder / "SLF.json", legacy)
    shutil.rmtree(folder)
    before = json.loads(legacy.read_text())
    rows = json.loads(run("compare", str(finetuned), "--format", "json").stdout)["rows"]
    assert [r["figures"]["clean"]["mean"] for r in rows if r["evaluation"] == "SLF"] == [100 * before["clean_accuracy"]]
    assert_user_error(run("evaluate", str(finetuned), "--mode", "SLF", "--pgd-steps", "1", "--test-limit", "16"),
                      "--force")  # the same settings as the old file
    other = run("evaluate", str(finetuned), "--mode", "SLF", "--pgd-steps", "1", "--test-limit", "8", "--eps-curve", "")
    assert other.exit_code == 0, other.output
    assert not legacy.exists() and json.loads((folder / "SLF.json").read_text()) == before  # moved, not lost
    assert len(list((finetuned / "evaluation").glob("*/SLF.json"))) == 2
