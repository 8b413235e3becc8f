"""Coreset selection in the run's precision: rounds run under the training step's autocast unless
``coreset.precision = "fp32"``, which gives exactly the fp32 selection; each round's time and precision are recorded."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from rsslctl.base.options import validate
from rsslctl.method.coreset import (
    CoresetOptions,
    CoresetRun,
    CoresetSelector,
    SelectionContext,
    run_selector,
    split_validation,
)
from rsslctl.run.build import build_method, load_split
from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load
from rsslctl.train.engine import Trainer
from rsslctl_plugins.selectors.rcs import RCS, RCSOptions

BF16 = torch.bfloat16


@pytest.fixture
def tiny_context(tiny_recipe: Path) -> SelectionContext:
    recipe = load(tiny_recipe)
    torch.manual_seed(0)
    method = build_method(recipe, torch.device("cpu"))
    train = load_split(recipe, "train").subset(torch.arange(96))
    pool, val = split_validation(96, 0.05, seed=0)
    return SelectionContext(train.images, train.labels, pool, val, 32, 11, method)


class Spy(CoresetSelector):
    """Records the autocast state a round runs under; selects the first ``budget`` pool indices."""

    name = "spy"
    seen: list[tuple[bool, torch.dtype]] = []

    def select(self, context: SelectionContext, budget: int) -> Tensor:
        Spy.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return context.pool[:budget]


@pytest.mark.parametrize("precision, expected", [("run", True), ("fp32", False)])
def test_rounds_run_under_the_run_autocast_unless_fp32(precision: str, expected: bool) -> None:
    Spy.seen = []
    options = validate(CoresetOptions, {"precision": precision, "fraction": 0.5}, "coreset")
    plan = CoresetRun(options, Spy(None), 64, 8, 3, seed=0)
    images, labels = torch.zeros(64, 3, 4, 4, dtype=torch.uint8), torch.zeros(64, dtype=torch.long)
    plan.active(1, images, labels, None, autocast_dtype=BF16)
    assert len(Spy.seen) == 1 and Spy.seen[0][0] is expected
    assert not torch.is_autocast_enabled("cpu")  # left as it was
    (round_,) = plan.history
    assert round_["precision"] == ("bf16 autocast" if expected else "fp32") and round_["seconds"] >= 0
    assert round_["epoch"] == 1 and round_["images"] == plan.budget and round_["pool"] == len(plan.pool)
    plan.active(1, images, labels, None)  # a run in fp32: no autocast whatever the option
    assert Spy.seen[-1][0] is False and plan.history[-1]["precision"] == "fp32"


def test_rcs_in_bf16_selects_a_valid_coreset_and_fp32_is_unchanged(tiny_context: SelectionContext) -> None:
    """On the fixture (an untrained tiny ACL model, where many units tie) bf16 does not pick the same units as fp32:
    the overlap is measured and documented in docs/coreset.md."""
    selector = RCS(RCSOptions(unit=4, steps=1))
    fp32 = run_selector(selector, tiny_context, 32)
    bf16 = run_selector(selector, dataclasses.replace(tiny_context, autocast_dtype=BF16), 32)
    assert len(bf16) == 32 and len(bf16.unique()) == 32 and set(bf16.tolist()) <= set(tiny_context.pool.tolist())
    assert torch.equal(bf16, run_selector(selector, dataclasses.replace(tiny_context, autocast_dtype=BF16), 32))
    assert 0 < len(set(bf16.tolist()) & set(fp32.tolist())) <= 32
    assert not torch.is_autocast_enabled("cpu")


def test_an_rcs_run_records_each_round_with_its_precision(tiny_recipe: Path, tmp_path: Path) -> None:
    recipe = load(tiny_recipe, ["coreset.name='rcs'", "coreset.fraction=0.4", "coreset.warmup_epochs=1",
                                "schedule.epochs=2", "engine.precision='bf16'", "coreset.unit=16"])
    run = tmp_path / "run"
    prepare_run_dir(recipe, run, force=False)
    trainer = Trainer(recipe, run, quiet=True)
    trainer.fit()
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert [e.get("selection_precision") for e in epochs] == [None, "bf16 autocast"]
    assert [h["epoch"] for h in trainer.coreset.history] == [2]
    with pytest.raises(Exception, match="coreset.precision"):
        load(tiny_recipe, ["coreset.name='rcs'", "coreset.precision='fp16'"])
