"""Run directories: creation without clobbering, the resolved recipe they hold, and the one rule every command that
writes follows: an existing output is only replaced with ``--force``."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Collection

from .checkpoint import atomic_write_text
from .errors import UserError
from .recipe import Recipe, dumps_toml, load

RECIPE_FILE = "recipe.toml"


def refuse_existing(path: Path, what: str, force: bool, hint: str = "") -> None:
    """UserError when ``path`` exists (a non-empty directory, or a file) and ``force`` is not given."""
    path = Path(path)
    taken = path.is_dir() and any(path.iterdir()) or path.is_file()
    if taken and not force:
        raise UserError(f"{path}: {what} already exists; pass --force to replace it{hint}")


def prepare_run_dir(recipe: Recipe, run_dir: Path | None, force: bool) -> Path:
    """Create the run directory; an existing one is only replaced with ``force``."""
    run_dir = Path(run_dir) if run_dir else Path(recipe.run.output_dir) / recipe.run.name
    refuse_existing(run_dir, "run directory", force, f", --resume {run_dir} to continue it, or --set run.name=NEW")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RECIPE_FILE, dumps_toml(recipe.resolved))
    return run_dir


def load_run_recipe(run_dir: Path, overrides: list[str] = (), only: Collection[str] | None = None) -> Recipe:
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no {RECIPE_FILE}); pass the directory `rsslctl pretrain` created")
    return load(path, overrides, only)
