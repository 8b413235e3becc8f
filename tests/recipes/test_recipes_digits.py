"""Every shipped recipe runs on the bundled digits with a tiny budget (one epoch of two steps)."""
from __future__ import annotations

import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import teacher_overrides, tiny_backbone

from rsslctl.base.registry import registry
from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load, resolve
from rsslctl.train.engine import Trainer

# the quickstart recipes already train on digits and are exercised by test_cli/test_engine
RECIPES = sorted(p for p in Path(__file__).resolve().parents[2].joinpath("recipes").glob("*.toml")
                 if not p.stem.startswith("quickstart"))
TINY = ["data.name=digits", "data.limit=32", "data.image_size=16", "schedule.epochs=1", "schedule.warmup_epochs=0",
        "schedule.batch_size=16",
        "engine.device=cpu", "engine.log_every=1"]
PER_METHOD = {  # shrink the expensive method options
    "empssl": ["method.n_views=2", "method.pre_dim=32", "method.hidden_dim=32", "method.z_dim=16",
               "method.eval_views=2"],
    "empssl_adv": ["method.n_views=2", "method.pre_dim=32", "method.hidden_dim=32", "method.z_dim=16",
                   "method.eval_views=2", "method.replays=2"],
    "mae": ["method.decoder_width=32", "method.decoder_depth=1", "engine.compile=false"],
    "adios": ["method.num_masks=2", "method.mask_width=8", "data.train_split=train"],
    "simclr_adv": ["method.replays=2", "method.pre_dim=32", "method.hidden_dim=32", "method.z_dim=16"],
}


def tiny_overrides(path: Path) -> list[str]:
    raw = load(path)
    out = list(TINY) + tiny_backbone(raw.method.cls, shipped=True)  # the recipe's own model at the tiny size
    if raw.resolved["attack"]["name"] != "none" and "steps" in raw.resolved["attack"]:  # FGSM takes no steps
        out.append("attack.steps=1")
    return out + PER_METHOD.get(raw.resolved["method"]["name"], [])


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_on_digits(path: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    raw = tomllib.loads(path.read_text())
    raw["data"] = {"name": "digits"}  # the recipe's dataset-specific keys (an image folder's path) do not apply
    cls = registry().get("method", raw["method"]["name"])
    recipe = resolve(raw, tiny_overrides(path) + teacher_overrides(cls, request), str(path))  # two-stage: tiny teacher
    steps = []
    trainer = Trainer(recipe, tmp_path / "run", quiet=True, on_step=steps.append)
    prepare_run_dir(recipe, tmp_path / "run", force=False)
    summary = trainer.fit()
    assert len(steps) == 2 * trainer.replays  # 32 images / batch 16, each minibatch replayed m times
    assert math.isfinite(summary["loss"])
    assert (tmp_path / "run" / "recipe.toml").is_file()


def test_cf_amc_ssl_without_cifar_gives_missing_data_error(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "rsslctl.cli", "pretrain", "recipes/cf_amc_ssl.toml", "--set", f"data.root={tmp_path}",
           "--set", f"run.output_dir={tmp_path / 'runs'}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 2
    assert "CIFAR-10" in res.stderr or "cifar10" in res.stderr
    assert "not found" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing written before the data is there
