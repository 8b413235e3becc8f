"""`rsslctl pretrain`: run a recipe (or continue a run) on the engine."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import click

from rsslctl.base.errors import UserError
from rsslctl.cli.common import SET, LaunchCommand, launch_options, launch_spec, start_ranks, user_errors
from rsslctl.run.directory import RunLock, check_replaceable, load_run_recipe, prepare_run_dir, refuse_existing
from rsslctl.run.recipe import load


def _trainer() -> type:
    """The engine's ``Trainer``, imported on first use (it imports torch): a module attribute, so a test can stand in
    for it (``monkeypatch.setattr(pretrain, "Trainer", …)``)."""
    if "Trainer" not in globals():
        from rsslctl.train.engine import Trainer
        globals()["Trainer"] = Trainer
    return globals()["Trainer"]


def __getattr__(name: str) -> type:
    if name == "Trainer":
        return _trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@click.command(cls=LaunchCommand)
@click.argument("recipe_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@SET
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default <output_dir>/<name>).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--from-checkpoint", "from_checkpoint", type=click.Path(file_okay=False, path_type=Path),
              help="With --resume: continue from this checkpoint of the run (e.g. when the newest one is corrupt).")
@click.option("--force", is_flag=True, help="Replace an existing run directory (only ever an rsslctl run).")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@launch_options
@user_errors
def pretrain(recipe_file: Path | None, overrides: tuple[str, ...], run_dir: Path | None, resume_dir: Path | None,
             from_checkpoint: Path | None, force: bool, quiet: bool, **launch: Any) -> None:
    """Pretrain an encoder with RECIPE_FILE (TOML)."""
    ranks = launch_spec(**launch)
    if resume_dir:
        if recipe_file or overrides or force or run_dir:
            raise UserError("--resume continues a run with its saved recipe; do not pass a recipe, --set, --run-dir "
                            "or --force with it")
        if not Path(resume_dir).is_dir():
            raise UserError(f"{resume_dir}: run directory not found")
        recipe = load_run_recipe(resume_dir)
        from rsslctl.run.validate import check_run
        from rsslctl.runtime import distributed
        Trainer = _trainer()  # noqa: N806 — the class, as the tests may have replaced it
        if ranks is not None:  # checked once here, before any rank starts
            check_resume_world(resume_dir, from_checkpoint, ranks.world_size)
            check_run(recipe, world=ranks.world_size)
            return start_ranks(ranks, recipe.engine.join_timeout_s)
        with (RunLock(resume_dir, "resuming pretraining") if distributed.is_main() else contextlib.nullcontext()):
            Trainer(recipe, resume_dir, quiet=quiet).fit(resume=True, from_checkpoint=from_checkpoint)
        return
    if from_checkpoint:
        raise UserError("--from-checkpoint goes with --resume RUN_DIR")
    if recipe_file is None:
        raise UserError("missing RECIPE_FILE; e.g. `rsslctl pretrain recipes/quickstart.toml` (or --resume RUN_DIR)")
    recipe = load(recipe_file, list(overrides))  # a typo is refused here, before torch is imported
    from rsslctl.run.validate import check_run
    from rsslctl.runtime import distributed
    Trainer = _trainer()  # noqa: N806
    run_dir = Path(run_dir) if run_dir else Path(recipe.run.output_dir) / recipe.run.name
    refuse_existing(run_dir, "run directory", force, f", --resume {run_dir} to continue it, or --set run.name=NEW")
    check_replaceable(run_dir, [Path(recipe.run.output_dir)])
    if ranks is not None:
        check_run(recipe, world=ranks.world_size)
        return start_ranks(ranks, recipe.engine.join_timeout_s)
    trainer = Trainer(recipe, run_dir, quiet=quiet)  # loads data and builds the model: fails before touching disk
    lock = RunLock(run_dir, "pretraining")
    try:  # under torchrun rank 0 prepares (and locks) the run directory; the others wait for it
        distributed.rank0_does(lambda: prepare_run_dir(recipe, run_dir, force, lock))
        trainer.fit()
    finally:
        lock.release()


def check_resume_world(run_dir: Path, from_checkpoint: Path | None, world: int) -> None:
    """The checkpoint to resume from was written by ``world`` processes (what ``Trainer.restore`` refuses too)."""
    from rsslctl.runtime.checkpoint import latest_checkpoint, read_meta
    ckpt = Path(from_checkpoint) if from_checkpoint else latest_checkpoint(Path(run_dir))
    if ckpt is None or not ckpt.is_dir():
        return  # nothing to resume from yet, or the rank reports the bad --from-checkpoint itself
    try:
        saved = int(read_meta(ckpt).get("world_size", 1))
    except (OSError, UserError):  # a corrupt checkpoint: the ranks name it, with the way out
        return
    if saved != world:
        raise UserError(f"{ckpt}: written by a run of {saved} process(es), resumed with {world}; resume with the "
                        f"same number (--nproc-per-node × --nnodes = {saved}), since each rank's random streams and "
                        "share of the batch are part of the state")
