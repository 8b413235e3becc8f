"""Sweeps: a base recipe × seeds × a grid of ``--set`` values, expanded into runs before anything starts.

Each run's directory (inside the sweep directory) is named by the hash of its resolved recipe, so the same command
finds the same directories again: finished runs are skipped, interrupted ones resumed. The manifest ``sweep.json``
lists the runs and their status; its ``sweep_hash`` (the runs plus the steps after pretraining) marks which sweep
owns the directory, and a different sweep is refused there. Nothing here starts a run (see ``rsslctl.sweep``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import tomllib
from pathlib import Path
from typing import Any

from rsslctl.base.errors import UserError
from rsslctl.base.files import atomic_write_text
from rsslctl.base.options import closest
from rsslctl.run.recipe import CORE, dumps_toml, load_raw, parse_override, resolve

FORMAT = "rsslctl-sweep"
VERSION = 1
MANIFEST = "sweep.json"
LOG = "sweep.log"
#: runs a sweep may expand to without ``--yes``
MAX_RUNS = 256
#: verbs a sweep can run after pretraining, with what their mode part may be (``finetune:slf``)
STEPS = {"evaluate": ("",), "finetune": ("slf", "alf", "aff", "all")}
STATUSES = ("done", "running", "failed", "pending")
#: top-level keys of a sweep file
SWEEP_KEYS = ("recipe", "seeds", "grid", "set", "after", "options", "executor", "jobs", "slurm")
#: recipe keys that name a run but do not change what it computes: left out of the hash
UNHASHED = {"run": ("name", "output_dir")}


@dataclasses.dataclass
class SweepSpec:
    """What a sweep file (or the flags) asks for; ``options`` holds extra command-line arguments per after-step verb."""

    recipe: str
    seeds: list[int] | None = None
    grid: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    overrides: list[str] = dataclasses.field(default_factory=list)
    after: list[str] = dataclasses.field(default_factory=lambda: ["evaluate"])
    options: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # executor, jobs, [slurm] of the file


@dataclasses.dataclass
class PlannedRun:
    """One run of a sweep: its name, directory (the recipe hash), seed, grid values and ``--set`` arguments."""

    name: str
    dir: str
    seed: int
    overrides: dict[str, Any]
    sets: list[str]


def is_sweep_file(path: Path) -> bool:
    """A TOML file with a top-level ``recipe = "..."`` is a sweep file; anything else is taken as a recipe."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return isinstance(raw.get("recipe"), str)


def load_spec(path: Path) -> SweepSpec:
    """Read a sweep file; its recipe path is relative to the sweep file (a shipped recipe name also works)."""
    path = Path(path)
    raw = tomllib.loads(path.read_text())
    for key in raw:
        if key not in SWEEP_KEYS:
            raise UserError(f"{path}: unknown sweep key '{key}'{closest(key, SWEEP_KEYS)}; valid keys: "
                            f"{', '.join(SWEEP_KEYS)}")
    recipe = raw["recipe"]
    if (path.parent / recipe).is_file():
        recipe = str(path.parent / recipe)
    spec = SweepSpec(recipe=recipe)
    seeds = raw.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise UserError(f"{path}: seeds must be a list of integers, e.g. seeds = [0, 1, 2]")
        spec.seeds = seeds
    grid = raw.get("grid", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) for v in grid.values()):
        raise UserError(f'{path}: [grid] maps "table.key" to a list of values, e.g. "method.temperature" = [0.2, 0.5]')
    spec.grid = dict(grid)
    for key in ("set", "after"):
        value = raw.get(key, [] if key == "set" else ["evaluate"])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{path}: {key} must be a list of strings")
        setattr(spec, "overrides" if key == "set" else "after", list(value))
    options = raw.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                                for v in options.values()):
        raise UserError(f'{path}: [options] maps a verb to its extra arguments, e.g. finetune = ["--epochs", "5"]')
    spec.options = dict(options)
    jobs = raw.get("jobs", 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= 1024:
        raise UserError(f"{path}: jobs must be an integer from 1 to 1024, got {jobs!r}")
    spec.settings = {k: raw[k] for k in ("executor", "jobs", "slurm") if k in raw}
    return spec


def parse_grid_flag(text: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2`` → (KEY, [V1, V2]); each value is read as TOML (else a string), like ``--set``."""
    if "=" not in text:
        raise UserError(f"--grid {text!r}: expected KEY=V1,V2, e.g. --grid method.temperature=0.2,0.5")
    key, raw = text.split("=", 1)
    values = [parse_override(f"{key}={v}")[1] for v in raw.split(",") if v.strip()]
    return key.strip(), values


def check_steps(after: list[str], options: dict[str, list[str]]) -> None:
    for step in after:
        verb, _, mode = step.partition(":")
        if verb not in STEPS:
            raise UserError(f"after: unknown step {step!r}; steps after pretraining: evaluate, finetune:slf, "
                            "finetune:alf, finetune:aff, finetune:all")
        if mode.lower() not in STEPS[verb]:
            choices = ", ".join(f"{verb}:{m}" if m else verb for m in STEPS[verb])
            raise UserError(f"after: {step!r} is not a step; choose {choices}")
    for verb in options:
        if verb not in STEPS:
            raise UserError(f"options: unknown verb '{verb}'; options are given to {', '.join(STEPS)}")
    if len(set(after)) != len(after):
        raise UserError(f"after: a step is listed twice ({', '.join(after)})")


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _set_text(key: str, value: Any) -> str:
    """A grid value as a ``--set`` argument that parses back to the same value."""
    line = dumps_toml({"t": {"v": value}}).splitlines()[1]  # 'v = <TOML value>'
    return f"{key}={line[4:]}"


def recipe_hash(resolved: dict[str, dict[str, Any]]) -> str:
    """Hash of what a resolved recipe computes (its name and output folder left out): the run's directory name."""
    kept = {t: {k: v for k, v in vals.items() if k not in UNHASHED.get(t, ())} for t, vals in resolved.items()}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def expand(spec: SweepSpec, cap: int = MAX_RUNS, yes: bool = False) -> list[PlannedRun]:
    """Every run of the sweep, each recipe fully validated; UserError (one line) on the first problem."""
    check_steps(spec.after, spec.options)
    raw = load_raw(spec.recipe)
    for key, _values in spec.grid.items():
        path = [p for p in key.split(".") if p]
        if len(path) != 2:
            raise UserError(f"grid {key!r}: the key must be table.key, e.g. method.temperature")
        if path[0] not in CORE:
            raise UserError(f"grid {key!r}: unknown table [{path[0]}]{closest(path[0], CORE)}")
        if key == "run.seed":
            raise UserError("grid 'run.seed': give seeds with --seeds (or seeds = [...]), not in the grid")
    seeds = spec.seeds if spec.seeds is not None else [None]
    count = len(seeds) * math.prod(len(v) for v in spec.grid.values())
    if count == 0:
        empty = [k for k, v in spec.grid.items() if not v] or ["seeds"]
        raise UserError(f"the sweep expands to zero runs ({empty[0]} has no values); give at least one value each")
    if count > cap and not yes:
        raise UserError(f"the sweep expands to {count} runs, more than {cap}; pass --yes to run them all, or "
                        "narrow --seeds/--grid")
    keys = list(spec.grid)
    runs: list[PlannedRun] = []
    seen: dict[str, str] = {}
    for seed, values in itertools.product(seeds, itertools.product(*spec.grid.values())):
        point = dict(zip(keys, values))
        sets = list(spec.overrides) + ([f"run.seed={seed}"] if seed is not None else [])
        sets += [_set_text(k, v) for k, v in point.items()]
        parts = ([f"seed{seed}"] if seed is not None else []) + [f"{k}={_value_text(v)}" for k, v in point.items()]
        name = "-".join(parts)
        name = name or "run"
        try:
            recipe = resolve(raw, sets, spec.recipe)
        except UserError as exc:
            raise UserError(f"sweep run {name}: {exc}") from None
        digest = recipe_hash(recipe.resolved)
        if digest in seen:
            raise UserError(f"sweep runs {seen[digest]} and {name} resolve to the same recipe; drop the duplicate "
                            "value from the grid or seeds")
        seen[digest] = name
        runs.append(PlannedRun(name, digest, recipe.run.seed, point, sets))
    return runs


def sweep_hash(spec: SweepSpec, runs: list[PlannedRun]) -> str:
    """Identity of a sweep: its runs and the steps after pretraining (with their options)."""
    ident = {"runs": sorted(r.dir for r in runs), "after": spec.after,
             "options": {k: spec.options[k] for k in sorted(spec.options)}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not an rsslctl sweep manifest; choose another --out")
    return data


def check_owner(out: Path, digest: str) -> None:
    """UserError unless ``out`` is absent, empty, or made by this same sweep."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    manifest = read_manifest(out)
    if manifest is None:
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"{out}: not empty and not a sweep directory (no {MANIFEST}); choose another --out")
        return
    if manifest.get("sweep_hash") != digest:
        raise UserError(f"{out}: made by another sweep (sweep hash {manifest.get('sweep_hash')}, this one {digest}); "
                        "choose another --out, or rerun that sweep's own command")


def write_manifest(out: Path, digest: str, spec: SweepSpec, runs: list[PlannedRun], status: dict[str, str]) -> None:
    """``sweep.json``, written atomically (a reader such as `rsslctl compare` never sees half of it)."""
    data = {"format": FORMAT, "version": VERSION, "sweep_hash": digest, "recipe": spec.recipe, "after": spec.after,
            "runs": [{"name": r.name, "dir": r.dir, "seed": r.seed, "overrides": r.overrides,
                      "status": status.get(r.dir, "pending")} for r in runs]}
    atomic_write_text(Path(out) / MANIFEST, json.dumps(data, indent=2) + "\n")
