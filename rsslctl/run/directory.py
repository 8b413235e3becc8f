"""Run directories: creation without clobbering, the marker that makes one recognisable, the advisory lock that keeps
two writers apart, the resolved recipe they hold, and the rules every command that writes follows: an existing
output is only replaced with ``--force``, ``--force`` only ever replaces an rsslctl run directory, and no command
writes into a path it also reads from."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Collection, Iterable

from rsslctl.base.errors import UserError
from rsslctl.run.recipe import Recipe, dumps_toml, load

#: the resolved recipe of a run, written at creation (every default filled in)
RECIPE_FILE = "recipe.toml"
#: written into every run directory at creation; ``--force`` replaces only directories that hold it
MARKER = ".rsslctl-run"
#: the advisory lock file of a run directory (fcntl.flock; released by the kernel when the process dies)
LOCK_FILE = ".rsslctl.lock"


def is_run_dir(path: Path) -> bool:
    """True for a directory rsslctl created as a run: it holds the marker (or, for runs written before the marker
    existed, a recipe.toml next to checkpoints/ or metrics.jsonl)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    return (path / RECIPE_FILE).is_file() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file())


def refuse_existing(path: Path, what: str, force: bool, hint: str = "") -> None:
    """UserError when ``path`` exists (a non-empty directory, or a file) and ``force`` is not given."""
    path = Path(path)
    taken = path.is_dir() and any(path.iterdir()) or path.exists() and not path.is_dir()
    if taken and not force:
        raise UserError(f"{path}: {what} already exists; pass --force to replace it{hint}")


def check_replaceable(path: Path, protected: Iterable[Path] = ()) -> None:
    """UserError unless ``--force`` may delete ``path``: an empty directory or an rsslctl run directory that is not
    the current directory, the output root, or a parent of either (or of any ``protected`` path)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise UserError(f"{path}: exists and is not a directory; --force only replaces rsslctl run directories")
    real = path.resolve()
    for keep in [Path.cwd(), Path.home(), *protected]:
        keep = Path(keep).resolve()
        if real == keep or real in keep.parents:
            raise UserError(f"{path}: refusing to replace {keep if real == keep else 'a parent of ' + str(keep)}; "
                            "--force only replaces a run directory, never the output directory or a parent")
    if any(path.iterdir()) and not is_run_dir(path):
        raise UserError(f"{path}: not an rsslctl run directory (no {MARKER} marker), so --force will not delete it; "
                        "choose another --run-dir or run.name, or move its files away yourself")


def check_output(out: Path, reads: Iterable[Path], what: str, force: bool) -> None:
    """An output file must not be (or be inside) anything the command reads, must not be a directory, and replaces
    an existing file only with ``force``."""
    out = Path(out)
    real = out.resolve()
    for src in reads:
        src = Path(src).resolve()
        if real == src or src in real.parents:
            raise UserError(f"{out}: {what} would overwrite {src}, which this command reads; choose another path")
    if out.is_dir():
        raise UserError(f"{out}: {what} is a directory; name a file")
    if not out.parent.is_dir():
        raise UserError(f"{out}: {what}: the folder {out.parent} does not exist; create it first")
    refuse_existing(out, what, force, " or choose another path")


class RunLock:
    """An exclusive advisory lock on a run directory, held by the one process that writes it (pretrain, resume)."""

    def __init__(self, run_dir: Path, purpose: str = "writing") -> None:
        self.run_dir = Path(run_dir)
        self.purpose = purpose
        self._fh: Any = None

    def acquire(self) -> "RunLock":
        if self._fh is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.run_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()[:200] or "another process"
            fh.close()
            raise UserError(f"{self.run_dir}: in use by {holder}; two processes cannot write one run — wait for it "
                            "to finish (or stop it), then retry") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"rsslctl process {os.getpid()} ({self.purpose})\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def prepare_run_dir(recipe: Recipe, run_dir: Path | None, force: bool, lock: RunLock | None = None) -> Path:
    """Create the run directory; an existing one is only replaced with ``force``, and only when it is an rsslctl run
    that no other process holds. ``lock`` (acquired here when given) stays held for the caller; otherwise a
    temporary lock covers the replacement."""
    output_dir = Path(recipe.run.output_dir)
    run_dir = Path(run_dir) if run_dir else output_dir / recipe.run.name
    refuse_existing(run_dir, "run directory", force, f", --resume {run_dir} to continue it, or --set run.name=NEW")
    check_replaceable(run_dir, [output_dir])
    own = lock is None
    lock = (lock or RunLock(run_dir, "creating the run")).acquire()
    try:
        for entry in run_dir.iterdir():  # the lock file stays: it is what keeps other writers out
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        from rsslctl.runtime.checkpoint import atomic_write_text  # torch: only when a run directory is written
        atomic_write_text(run_dir / MARKER, json.dumps({"format": "rsslctl-run/1"}) + "\n")
        atomic_write_text(run_dir / RECIPE_FILE, dumps_toml(recipe.resolved))
    finally:
        if own:
            lock.release()
    return run_dir


def load_run_recipe(run_dir: Path, overrides: list[str] = (), only: Collection[str] | None = None,
                    load_plugins: bool = True) -> Recipe:
    """The resolved recipe a run directory holds (+ overrides); options added since the run was written keep the
    behaviour it was made with (see ``opt(earlier=...)``)."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no {RECIPE_FILE}); pass the directory `rsslctl pretrain` "
                        "created")
    return load(path, overrides, only, load_plugins, saved=True)
