"""One validation pass: `rsslctl recipe show` refuses exactly what `rsslctl pretrain` refuses before training."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY, TINY_BACKBONES

from rsslctl.cli import main
from rsslctl.train.engine import Trainer

#: (overrides of the tiny recipe, a fragment of the one-line refusal); each passes `recipe.resolve` alone and needs
#: the data, the device or the built model to be refused
BAD = [
    (["data.limit=64", "schedule.batch_size=200"], "schedule.batch_size = 200 exceeds the 64 training images"),
    (["engine.cuda_graphs=true"], "engine.cuda_graphs needs engine.compile = true and a CUDA device"),
    (["coreset.name='rcs'", "coreset.validation_fraction=0"], "needs an unlabeled validation set"),
    (["data.limit=40", "coreset.name='random'", "coreset.validation_fraction=0.5"],
     "the 20 training images left after the validation split are fewer than schedule.batch_size = 32"),
    (["method.name='simclr'", "attack.name='none'", "coreset.name='rcs'"], "exposes no coreset target"),
    ([*TINY_BACKBONES["vit"], "encoder.dual_bn='on'"], "has no BatchNorm layer"),
]


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace('name = "tiny"', f'name = "tiny"\noutput_dir = "{tmp_path / "runs"}"'))
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in result.output, err
    return err


@pytest.mark.parametrize(("overrides", "fragment"), BAD, ids=[b[1][:40] for b in BAD])
def test_recipe_show_and_pretrain_refuse_the_same_recipes_alike(recipe_file: Path, overrides: list[str],
                                                                fragment: str) -> None:
    shown = one_line_error(invoke("recipe", "show", str(recipe_file), *sets(overrides)))
    trained = one_line_error(invoke("pretrain", str(recipe_file), "--quiet", *sets(overrides)))
    assert fragment in shown
    assert shown == trained
    assert not (recipe_file.parent / "runs").exists()  # pretrain refused before touching disk


def test_the_good_recipe_is_accepted_by_both(recipe_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shown = invoke("recipe", "show", str(recipe_file))
    assert shown.exit_code == 0, shown.output
    assert "[schedule]" in shown.stdout
    fitted = []
    monkeypatch.setattr(Trainer, "fit", lambda self, **kw: fitted.append(self.steps_per_epoch) or {})
    trained = invoke("pretrain", str(recipe_file), "--quiet")
    assert trained.exit_code == 0, trained.output
    assert fitted == [96 // 32]  # reached training, with the split the checks measured


def test_recipe_show_without_the_data_files_says_which_checks_it_skipped(tmp_path: Path) -> None:
    path = tmp_path / "cifar.toml"
    path.write_text(TINY.replace('name = "digits"', f'name = "cifar10"\nroot = "{tmp_path / "nothing"}"'))
    shown = invoke("recipe", "show", str(path))
    assert shown.exit_code == 0, shown.output
    assert "data files not found" in shown.stderr and "checks that need the training split were skipped" in shown.stderr
    refused = one_line_error(invoke("pretrain", str(path), "--quiet", "--set", f"run.output_dir='{tmp_path}/r'"))
    assert "data files not found" in refused
