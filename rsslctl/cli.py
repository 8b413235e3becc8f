"""The ``rsslctl`` command line. Bad input: one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import click
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import UserError
from .ui import console, err_console, summary_table


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted; continue with `rsslctl pretrain --resume RUN_DIR`")
            sys.exit(130)
    return wrapper


SET = click.option("--set", "overrides", multiple=True, metavar="KEY.SUB=VALUE",
                   help="Override a recipe value, e.g. --set schedule.epochs=5 (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rsslctl")
def main() -> None:
    """Robust self-supervised learning: pretrain, fine-tune and evaluate robust encoders."""


@main.command()
@click.argument("recipe_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@SET
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default <output_dir>/<name>).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--force", is_flag=True, help="Replace an existing run directory.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@user_errors
def pretrain(recipe_file: Path | None, overrides: tuple[str, ...], run_dir: Path | None, resume_dir: Path | None,
             force: bool, quiet: bool) -> None:
    """Pretrain an encoder with RECIPE_FILE (TOML)."""
    from .engine import Trainer
    from .recipe import load
    from .runs import load_run_recipe, prepare_run_dir
    if resume_dir:
        if recipe_file or overrides or force:
            raise UserError("--resume continues a run with its saved recipe; do not pass a recipe, --set or --force with it")
        recipe = load_run_recipe(resume_dir)
        Trainer(recipe, resume_dir, quiet=quiet).fit(resume=True)
        return
    if recipe_file is None:
        raise UserError("missing RECIPE_FILE; e.g. `rsslctl pretrain recipes/quickstart.toml` (or --resume RUN_DIR)")
    recipe = load(recipe_file, list(overrides))
    trainer_dir = Path(run_dir) if run_dir else Path(recipe.run.output_dir) / recipe.run.name
    if trainer_dir.exists() and any(trainer_dir.iterdir()) and not force:
        prepare_run_dir(recipe, trainer_dir, force)  # raises the clear 'exists' error before any work
    trainer = Trainer(recipe, trainer_dir, quiet=quiet)  # loads data and builds the model: fails before touching disk
    prepare_run_dir(recipe, trainer_dir, force)
    trainer.fit()


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@SET
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@user_errors
def evaluate(run_dir: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """Linear probe on frozen features, then clean and PGD-20 accuracy (saved to RUN_DIR/eval.json)."""
    import json

    from .evaluate import evaluate_run
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    result = evaluate_run(run_dir, list(overrides))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    a = result["attack"]
    console.print(summary_table(f"evaluation of {run_dir} (epoch {result['epoch']})", {
        "protocol": result["protocol"], "BN route": result["route"], "test images": result["test_images"],
        "clean accuracy": f"{100 * result['clean_accuracy']:.2f} %",
        f"robust accuracy ({a['name'].upper()}-{a['steps']}, ε {a['eps'] * 255:.3g}/255)": f"{100 * result['robust_accuracy']:.2f} %",
        "saved to": str(Path(run_dir) / "eval.json")}))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output file (default RUN_DIR/encoder.safetensors).")
@click.option("--route", type=click.Choice(["auto", "normal", "pgd"]), default="auto", show_default=True,
              help="BN route of a dual-BN encoder to export.")
@user_errors
def export(run_dir: Path, out: Path | None, route: str) -> None:
    """Write the encoder alone as safetensors, loadable into timm.create_model(name, num_classes=0)."""
    from .runs import export_encoder
    path, info = export_encoder(run_dir, out, route)
    console.print(f"wrote {path} (BN route {info['bn_route']}); rebuild with {info['backbone']}")


@main.command()
@click.option("--options", "show_options", is_flag=True, help="Also list every plugin's options and defaults.")
@user_errors
def plugins(show_options: bool) -> None:
    """List installed plugins: kind, name, package, version, description (broken ones with their error)."""
    from .options import describe
    from .registry import registry
    table = Table(title="rsslctl plugins")
    for col in ("kind", "name", "package", "version", "description"):
        table.add_column(col)
    for info in registry().all():
        desc = f"[red]failed to load: {escape(info.error)}[/]" if info.error else escape(info.doc)
        table.add_row(info.kind, info.name, info.package, info.version, desc)
        if show_options and info.cls is not None:
            for name, tname, default, help_ in describe(info.cls.Options):
                table.add_row("", f"  .{name}", "", "", f"{tname} = {default!r}  {help_}")
    console.print(table)


@main.command("dynacl-pp")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New run directory for the post-processed encoder (evaluate it with `rsslctl evaluate`).")
@click.option("--clusters", default=10, show_default=True, help="k-means clusters for the pseudo labels.")
@click.option("--probe-epochs", default=10, show_default=True, help="Linear probing epochs on pseudo labels.")
@click.option("--epochs", default=25, show_default=True, help="Pseudo-label TRADES epochs.")
@click.option("--batch-size", default=512, show_default=True, help="Batch size of both stages.")
@click.option("--steps", default=10, show_default=True, help="PGD steps of the TRADES attack.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@user_errors
def dynacl_pp(run_dir: Path, out_dir: Path, clusters: int, probe_epochs: int, epochs: int, batch_size: int,
              steps: int, force: bool) -> None:
    """DynACL++ post-processing of RUN_DIR: k-means pseudo labels, linear probing, pseudo-label TRADES."""
    from .postprocess import PostprocessOptions, dynacl_pp as run
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    for name, value in (("--clusters", clusters), ("--probe-epochs", probe_epochs), ("--epochs", epochs),
                        ("--batch-size", batch_size), ("--steps", steps)):
        if value < 1 or (name == "--clusters" and value < 2):
            raise UserError(f"{name} = {value}: must be at least {2 if name == '--clusters' else 1}")
    info = run(run_dir, out_dir, PostprocessOptions(clusters=clusters, probe_epochs=probe_epochs, epochs=epochs,
                                                    batch_size=batch_size, steps=steps), force)
    console.print(f"wrote {out_dir} (pseudo-label cluster sizes {info['cluster_sizes']}); "
                  f"evaluate with `rsslctl evaluate {out_dir}`")
@main.command("select-coreset")
@click.argument("recipe_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Select with this run's current encoder (its newest checkpoint) and saved recipe.")
@click.option("--fraction", type=float, required=True, help="Coreset size as a fraction of the training pool, in (0, 1].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output file: .safetensors (indices tensor, metadata in the header) or .json.")
@SET
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@user_errors
def select_coreset(recipe_file: Path | None, run_dir: Path | None, fraction: float, out: Path,
                   overrides: tuple[str, ...], force: bool) -> None:
    """Select a training coreset (RCS unless [coreset] name says otherwise) and write its indices.

    Train on it with `--set coreset.indices_file=OUT` in `rsslctl pretrain`.
    """
    from .coreset import select_standalone
    meta = select_standalone(recipe_file, run_dir, fraction, out, list(overrides), force)
    console.print(summary_table(f"coreset written to {out}", {
        "selector": meta["selector"], "images": f"{meta['size']} of {meta['pool_size']} "
        f"(fraction {meta['fraction']:g}, {meta['validation_size']} held out for validation)",
        "encoder": f"{meta['source']} (epoch {meta['epoch']}), sha256 {meta['encoder_sha256'][:16]}…",
        "selection time": f"{meta['seconds']:.1f} s", "use it": f"--set coreset.indices_file={str(out)!r}"}))


@main.group()
def recipe() -> None:
    """Inspect recipes."""


@recipe.command("show")
@click.argument("recipe_file", type=click.Path(dir_okay=False, path_type=Path))
@SET
@user_errors
def recipe_show(recipe_file: Path, overrides: tuple[str, ...]) -> None:
    """Print the fully resolved recipe (all defaults filled in) after validation."""
    from .recipe import dumps_toml, load
    click.echo(dumps_toml(load(recipe_file, list(overrides)).resolved), nl=False)


if __name__ == "__main__":
    main()
