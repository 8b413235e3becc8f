"""`rsslctl select-coreset`: select a training coreset once and write its indices for `--set coreset.indices_file`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from rsslctl import __version__
from rsslctl.base.console import console, summary_table
from rsslctl.base.errors import UserError
from rsslctl.cli.common import SET, LaunchCommand, launch_options, launch_spec, start_ranks, user_errors
from rsslctl.run.directory import RECIPE_FILE, check_output
from rsslctl.run.recipe import NONE, Recipe, load_raw, resolve, shipped_defaults


def selection_recipe(recipe_file: Path | None, run_dir: Path | None, fraction: float, out: Path,
                     overrides: list[str] = (), force: bool = False) -> Recipe:
    """The recipe ``select_standalone`` selects with, after the checks of its arguments."""
    from rsslctl.runtime.checkpoint import CKPT_DIR
    if (recipe_file is None) == (run_dir is None):
        raise UserError("select-coreset: pass either a RECIPE file or --run-dir RUN (whose current encoder is used)")
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction {fraction}: must be in (0, 1], e.g. --fraction 0.05")
    out = Path(out)
    if out.suffix not in (".safetensors", ".json"):
        raise UserError(f"--out {out}: use a .safetensors or .json file name")
    source = Path(run_dir) / RECIPE_FILE if run_dir else Path(recipe_file)
    reads = [source] + ([Path(run_dir) / CKPT_DIR, Path(run_dir) / "metrics.jsonl"] if run_dir else [])
    check_output(out, reads, "--out file", force)
    if run_dir and not source.is_file():
        raise UserError(f"{run_dir}: not a run directory (no {RECIPE_FILE}); pass the directory `rsslctl pretrain` "
                        "created")
    if run_dir:
        from rsslctl.runtime.checkpoint import latest_checkpoint
        if latest_checkpoint(Path(run_dir)) is None:
            raise no_encoder(run_dir)
    raw = load_raw(source)
    table = raw.get("coreset", {}) if isinstance(raw.get("coreset"), dict) else {}
    # this command selects once: no warm-up, no file to consume; the recipe's selector (or the default one) selects
    default = shipped_defaults()["commands"]["select_coreset_selector"]
    fixed = [] if table.get("name", NONE) != NONE else [f"coreset.name={default}"]
    return resolve(raw, fixed + ['coreset.indices_file=""', "coreset.warmup_epochs=0", *overrides,
                                 f"coreset.fraction={fraction!r}"], str(source))


def no_encoder(run_dir: Path) -> UserError:
    return UserError(f"{run_dir}: no checkpoint yet, so there is no encoder to select with; pretrain first (or pass "
                     "the RECIPE to select with the untrained model)")


def select_standalone(recipe_file: Path | None, run_dir: Path | None, fraction: float, out: Path,
                      overrides: list[str] = (), force: bool = False) -> dict[str, Any]:
    """Select a coreset once with the encoder of ``run_dir`` (its newest checkpoint) or, with a recipe, of the
    freshly initialised model; write indices + metadata to ``out``; return the metadata."""
    import torch  # here, not at the top: `rsslctl select-coreset --help` imports no torch

    from rsslctl.method.coreset import (
        CoresetRun,
        SelectionContext,
        encoder_sha256,
        precision_name,
        run_selector,
        save_selection,
    )
    from rsslctl.run.build import build_method, load_train_split, load_weights, setup_device, uses_bf16
    from rsslctl.runtime import distributed
    from rsslctl.runtime.checkpoint import load_latest, refuse_nonfinite
    from rsslctl.runtime.seeding import derive_seed
    out = Path(out)
    recipe = selection_recipe(recipe_file, run_dir, fraction, out, overrides, force)
    device = setup_device(recipe)
    torch.manual_seed(recipe.run.seed)
    method = build_method(recipe, device)
    ckpt, epoch = None, 0
    if run_dir:
        found = load_latest(Path(run_dir))
        if found is None:  # removed since selection_recipe looked
            raise no_encoder(run_dir)
        ckpt, state, _, meta = found
        refuse_nonfinite(state, str(ckpt))
        load_weights(method, state, ckpt)
        epoch = int(meta["epoch"])
    train = load_train_split(recipe)
    selector = recipe.selector.build()
    bs = recipe.schedule.batch_size
    plan = CoresetRun(recipe.coreset, selector, len(train), bs, recipe.schedule.epochs, recipe.run.seed)
    seed = derive_seed(recipe.run.seed, epoch + 1)
    t0 = time.perf_counter()
    amp = torch.bfloat16 if recipe.coreset.precision == "run" and uses_bf16(device, recipe.engine.precision) else None
    indices = run_selector(selector, SelectionContext(train.images.to(device), train.labels.to(device), plan.pool,
                                                      plan.validation, bs, seed, method, amp), plan.budget)
    meta = {"format": "rsslctl-coreset/1", "selector": selector.name, "fraction": fraction, "size": len(indices),
            "seed": recipe.run.seed, "selection_seed": seed, "options": recipe.resolved["coreset"],
            "encoder_sha256": encoder_sha256(method.eval_encoder()), "source": str(run_dir or recipe_file),
            "checkpoint": str(ckpt) if ckpt else None, "epoch": epoch, "dataset": recipe.dataset.name,
            "train_split": recipe.data.train_split, "limit": recipe.data.limit, "train_size": len(train),
            "pool_size": len(plan.pool), "validation_size": len(plan.validation), "batch_size": bs,
            "seconds": time.perf_counter() - t0, "precision": precision_name(amp), "rsslctl": __version__}
    distributed.rank0_does(lambda: save_selection(out, indices, meta))  # under torchrun every rank selected alike
    return meta


@click.command("select-coreset", cls=LaunchCommand)
@click.argument("recipe_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Select with this run's current encoder (its newest checkpoint) and saved recipe.")
@click.option("--fraction", type=float, required=True,
              help="Coreset size as a fraction of the training pool, in (0, 1].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output file: .safetensors (indices tensor, metadata in the header) or .json.")
@SET
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@launch_options
@user_errors
def select_coreset(recipe_file: Path | None, run_dir: Path | None, fraction: float, out: Path,
                   overrides: tuple[str, ...], force: bool, **launch: Any) -> None:
    """Select a training coreset (the recipe's [coreset] selector, else the default one) and write its indices.

    Train on it with `--set coreset.indices_file=OUT` in `rsslctl pretrain`.
    """
    ranks = launch_spec(**launch)
    if ranks is not None:  # the arguments and the recipe are checked once here, before any rank starts
        recipe = selection_recipe(recipe_file, run_dir, fraction, out, list(overrides), force)
        from rsslctl.run.validate import check_before_launch
        check_before_launch(recipe)  # the data can be read, the engine fits the device
        return start_ranks(ranks, recipe.engine.join_timeout_s)
    meta = select_standalone(recipe_file, run_dir, fraction, out, list(overrides), force)
    console.print(summary_table(f"coreset written to {out}", {
        "selector": meta["selector"], "images": f"{meta['size']} of {meta['pool_size']} "
        f"(fraction {meta['fraction']:g}, {meta['validation_size']} held out for validation)",
        "encoder": f"{meta['source']} (epoch {meta['epoch']}), sha256 {meta['encoder_sha256'][:16]}…",
        "selection time": f"{meta['seconds']:.1f} s ({meta['precision']})",
        "use it": f"--set coreset.indices_file={str(out)!r}"}))
