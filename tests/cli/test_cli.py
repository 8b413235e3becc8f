"""CLI behaviour: clear one-line errors with exit code 2, recipe show, plugins, third-party plugins, evaluate."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_user_error, run


@pytest.mark.parametrize("override, fragments", [
    ("method.temprature=0.3", ["unknown key 'temprature'", "did you mean 'temperature'"]),
    ("schedule.epochs=abc", ["schedule.epochs", "expected an integer"]),
    ("schedule.epochs=0", ["schedule.epochs", "below the minimum 1"]),
    ("attack.eps=-0.1", ["attack", "eps", "below the minimum"]),
    ("attack.eps='8/0'", ["expected a number such as 0.03 or '8/255'"]),
    ("method.name=acll", ["unknown method 'acll'", "did you mean 'acl'", "installed:", "simclr"]),
    ("attack.name=pgdd", ["unknown attack 'pgdd'", "installed:", "fgsm"]),
    ("backbone.model=resnet19", ["unknown timm model 'resnet19'", "did you mean"]),
    ("method.variant=dual", ["method", "variant", "'ds'"]),
    ("optimizer.name=rmsprop", ["optimizer.name", "'lars'"]),
    ("engine.device=tpu", ["engine.device"]),
    ("sheduler.epochs=3", ["unknown table [sheduler]", "did you mean 'schedule'"]),
    ("attack.name=none", ["method 'acl' trains adversarially and needs an attack"]),
])
def test_bad_recipe_values_give_one_line_errors(tiny_recipe: Path, override: str, fragments: list[str]) -> None:
    assert_user_error(run("pretrain", str(tiny_recipe), "--set", override, "--quiet"), *fragments)
    assert not (tiny_recipe.parent / "runs").exists()  # nothing was created


def test_missing_data_files_say_where_and_how(tiny_recipe: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("pretrain", str(tiny_recipe), "--set", "data.name=cifar10", "--set", f"data.root={str(empty)!r}",
                 "--set", "data.limit=0", "--quiet")
    assert_user_error(result, "cifar10", "not found", str(empty.resolve()), "data.download")
    assert not (tmp_path / "runs").exists()


def test_malformed_toml_and_missing_file(tmp_path: Path, tiny_recipe: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[method\nname = 'acl'\n")
    assert_user_error(run("pretrain", str(bad)), "invalid TOML", "line 1")
    assert_user_error(run("recipe", "show", str(tmp_path / "nope.toml")), "recipe file not found")
    assert_user_error(run("recipe", "show", str(tiny_recipe), "--set", "noequals"), "expected key.sub=value")


def test_recipe_show_prints_resolved_recipe_with_overrides(tiny_recipe: Path) -> None:
    result = run("recipe", "show", str(tiny_recipe), "--set", "method.temperature=0.2", "--set", "attack.eps=4/255")
    assert result.exit_code == 0, result.output
    import tomllib
    resolved = tomllib.loads(result.stdout)
    assert resolved["method"] == {"name": "acl", "variant": "ds", "weight": 0.0, "temperature": 0.2}
    assert resolved["attack"]["eps"] == pytest.approx(4 / 255)
    assert resolved["optimizer"]["momentum"] == 0.9  # defaults filled in
    assert set(resolved) >= {"run", "data", "augment", "backbone", "encoder", "method", "attack", "optimizer",
                             "schedule", "engine", "evaluation"}


def test_plugins_lists_builtins_third_party_and_broken() -> None:
    result = run("plugins")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for name in ("acl", "simclr", "pgd", "fgsm", "timm", "digits", "cifar10", "stl10", "svhn", "imagenet32"):
        assert f" {name} " in out, name
    line = next(ln for ln in out.splitlines() if "align_uniform" in ln)
    assert "rsslctl-example-plugin" in line and "0.3.0" in line and "Alignment" in line
    broken = next(ln for ln in out.splitlines() if "broken_example" in ln)
    assert "failed to load" in broken and "broken on purpose" in broken
    assert "temperature" in run("plugins", "--options").stdout


def test_third_party_method_trains_from_a_recipe(tiny_recipe: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "au"
    result = run("pretrain", str(tiny_recipe), "--run-dir", str(run_dir), "--quiet", "--set",
                 "method.name=align_uniform",
                 "--set", "attack.name=none", "--set", "schedule.epochs=1", "--set", "method.t=3")
    assert result.exit_code == 0, result.output
    steps = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"align", "uniform"} <= set(steps[0])
    assert (run_dir / "checkpoints" / "epoch-0001" / "model.safetensors").is_file()


def test_existing_run_dir_needs_force_and_resume_rejects_extra_args(tiny_recipe: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    assert_user_error(run("pretrain", str(tiny_recipe), "--run-dir", str(run_dir)), "already exists", "--force")
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert_user_error(run("pretrain", str(tiny_recipe), "--resume", str(run_dir)), "--resume continues a run")
    assert_user_error(run("evaluate", str(tmp_path / "nowhere")), "run directory not found")
    assert_user_error(run("evaluate", str(run_dir)), "not a run directory")


def test_pretrain_evaluate_export_end_to_end(tiny_recipe: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "e2e"
    assert run("pretrain", str(tiny_recipe), "--run-dir", str(run_dir), "--quiet", "--set",
               "schedule.epochs=1").exit_code == 0
    result = run("evaluate", str(run_dir), "--json")
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    saved = Path(res.pop("saved_to"))
    assert res == json.loads(saved.read_text()) and saved.parent.parent == run_dir / "eval"
    assert 0 <= res["robust_accuracy"] <= res["clean_accuracy"] <= 1
    assert res["clean_accuracy"] > 0.2  # 10 balanced classes: chance is 0.1
    assert res["route"] == "pgd" and res["test_images"] == 64
    result = run("export", str(run_dir))
    assert result.exit_code == 0 and (run_dir / "encoder.safetensors").is_file()


def test_real_process_error_has_no_traceback(tiny_recipe: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rsslctl.cli", "pretrain", str(tiny_recipe), "--set",
                           "schedule.epochs=-1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "schedule.epochs" in proc.stderr
