"""Instant commands: help, listing, copying, citing and refusing a bad recipe import no torch (nor timm, torchvision,
kornia); the heavy modules load only when a command needs them. Each case runs in a fresh interpreter, since this
test process has long imported torch."""
from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rsslctl.cli.app import VERBS, load_verb

HEAVY = ("torch", "timm", "torchvision", "kornia")
#: runs the CLI with the given arguments, then reports its exit code and which heavy modules it imported
PROBE = """
import json, sys
sys.argv = ["rsslctl", *sys.argv[1:]]
from rsslctl.cli import main
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


def _probe(*args: str, cwd: Path | None = None) -> tuple[int, list[str], str]:
    """(exit code, heavy modules imported, stderr without the probe's line) of `rsslctl ARGS` in a new process."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    *lines, last = proc.stderr.strip().splitlines()
    result = json.loads(last)
    return result["code"], result["heavy"], "\n".join(lines)


def test_the_installed_metadata_declares_the_builtin_plugins() -> None:
    names = {ep.name for ep in md.entry_points(group="rsslctl.declarations")}
    assert {"rsslctl_methods", "example"} <= names, \
        "stale install metadata: rerun `pip install --no-deps -e . -e tests/example_plugin`"


@pytest.mark.parametrize("args", [
    ["--help"], ["pretrain", "--help"], ["select-coreset", "--help"], ["export", "--help"], ["cite", "--help"],
    ["recipe", "--help"], ["recipe", "show", "--help"], ["recipe", "list"], ["plugins"], ["plugins", "--options"],
    ["evaluate", "--help"], ["finetune", "--help"], ["import", "--help"], ["dynacl-pp", "--help"],
    ["count-params", "--help"], ["no-such-verb"],
])
def test_help_and_listing_import_no_torch(args: list[str]) -> None:
    code, heavy, _ = _probe(*args)
    assert code in (0, 2) and heavy == [], (args, heavy)


def test_recipe_copy_and_cite_import_no_torch(tmp_path: Path) -> None:
    code, heavy, _ = _probe("recipe", "copy", "quickstart", str(tmp_path / "recipe.toml"))
    assert code == 0 and heavy == [] and (tmp_path / "recipe.toml").is_file()
    code, heavy, err = _probe("cite", str(tmp_path))  # a run directory is a recipe.toml (and what training wrote)
    assert code == 0 and heavy == [], err


@pytest.mark.parametrize("override, message", [
    ("method.nonexistent=1", "method: unknown key 'nonexistent'"),
    ("optimizer.lr='fast'", "optimizer.lr: expected a number"),
    ("schedule.epochs=0", "schedule.epochs"),
    ("method.name='simclrr'", "unknown method 'simclrr' (did you mean 'simclr'?)"),
    ("attack.eps=-1", "attack.eps"),
])
def test_a_bad_recipe_is_refused_in_one_line_before_torch_is_imported(tiny_recipe: Path, override: str,
                                                                      message: str) -> None:
    code, heavy, err = _probe("pretrain", str(tiny_recipe), "--set", override)
    assert code == 2 and heavy == [], (heavy, err)
    assert message in err and len(err.splitlines()) == 1, err


def test_a_good_recipe_does_load_the_plugins_it_names(tiny_recipe: Path) -> None:
    """The other side: laziness defers the plugins' own checks, it does not skip them."""
    code, heavy, err = _probe("pretrain", str(tiny_recipe), "--set", "backbone.model='resnet19'")
    assert code == 2 and "unknown timm model 'resnet19'" in err and "timm" in heavy


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verbs_listed_help_is_its_own(verb: str) -> None:
    target, short = VERBS[verb]
    assert load_verb(target).get_short_help_str(1000) == short
