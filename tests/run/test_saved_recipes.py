"""Options added to change a behaviour keep the old behaviour for runs saved before they existed (``opt(earlier=)``):
a new default never changes a run half-way through a resume, while a new recipe gets the new default."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from conftest import TINY

from rsslctl.base import registry
from rsslctl.run.directory import RECIPE_FILE, load_run_recipe
from rsslctl.run.recipe import dumps_toml, load

#: every method option that declares an ``earlier`` value (found from the registry, not listed by hand)
CHANGED = [(name, f.name, f.metadata["earlier"], f.default) for name in registry.registry().names("method")
           for cls in [registry.get("method", name)]
           for f in dataclasses.fields(cls.Options) if "earlier" in f.metadata]


def test_the_behaviour_switches_added_for_fidelity_declare_their_earlier_value() -> None:
    found = {(m, k) for m, k, _, _ in CHANGED}
    assert {("adco", "joint_forward"), ("adios", "joint_forward"), ("byorl", "joint_forward"),
            ("byorl", "average_directions"), ("caco", "joint_forward"), ("caco", "cosine_momentum"),
            ("advcl", "attack_bn")} <= found
    assert all(earlier != default for _, _, earlier, default in CHANGED)  # else the switch changed nothing


@pytest.mark.parametrize(("method", "key", "earlier", "default"), CHANGED, ids=[f"{m}.{k}" for m, k, _, _ in CHANGED])
def test_a_run_saved_before_an_option_existed_keeps_its_behaviour(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                   method: str, key: str, earlier, default) -> None:
    source = tmp_path / "new.toml"
    source.write_text(TINY)
    fresh = load(source, [f"method.name='{method}'"], only={"method"})
    assert getattr(fresh.method.options, key) == default  # a new recipe gets the new default, silently
    assert "note:" not in capsys.readouterr().err

    old = {t: dict(v) for t, v in fresh.resolved.items()}
    del old["method"][key]  # what a run directory written before the option existed holds
    run = tmp_path / "run"
    run.mkdir()
    (run / RECIPE_FILE).write_text(dumps_toml(old))
    assert key not in tomllib.loads((run / RECIPE_FILE).read_text())["method"]
    saved = load_run_recipe(run, only={"method"})
    assert getattr(saved.method.options, key) == earlier
    assert f"saved before '{key}' existed" in capsys.readouterr().err

    (run / RECIPE_FILE).write_text(dumps_toml(fresh.resolved))  # a run that recorded the option keeps what it says
    assert getattr(load_run_recipe(run, only={"method"}).method.options, key) == default
    assert "note:" not in capsys.readouterr().err
