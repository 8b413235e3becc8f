"""`rsslctl plugins` and `rsslctl recipe show`: what is installed, and what a recipe resolves to."""
from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from rsslctl.base.console import console
from rsslctl.base.errors import DataMissing, UserError
from rsslctl.base.options import describe
from rsslctl.base.registry import registry
from rsslctl.cli.common import SET, user_errors
from rsslctl.run.directory import refuse_existing
from rsslctl.run.recipe import dumps_toml, load, shipped_recipes


@click.command()
@click.option("--options", "show_options", is_flag=True, help="Also list every plugin's options and defaults.")
@user_errors
def plugins(show_options: bool) -> None:
    """List installed plugins: kind, name, package, version, description (broken ones with their error)."""
    table = Table(title="rsslctl plugins")
    for col in ("kind", "name", "package", "version", "description"):
        table.add_column(col)
    for info in registry().all():
        usable = info.declared is not None or info.cls is not None  # declared: not imported, not failed
        desc = f"[red]{'failed to load: ' if info.kind != 'command' and not usable else ''}{escape(info.error)}[/]" \
            if info.error else escape(info.doc)
        table.add_row(info.kind, info.name, info.package, info.version, desc)
        if show_options and usable and info.kind != "command":
            for name, tname, default, help_ in describe(info.options):
                table.add_row("", f"  .{name}", "", "", f"{tname} = {default!r}  {help_}")
    console.print(table)


@click.group()
def recipe() -> None:
    """Inspect recipes."""


@recipe.command("show")
@click.argument("recipe_file", type=click.Path(dir_okay=False, path_type=Path))
@SET
@user_errors
def recipe_show(recipe_file: Path, overrides: tuple[str, ...]) -> None:
    """Print the fully resolved recipe (all defaults filled in) after validation: the same checks as `pretrain`
    makes before training (the model is built, the training split's size read; nothing is trained)."""
    resolved = load(recipe_file, list(overrides))
    import torch

    from rsslctl.run.build import build_method
    from rsslctl.run.validate import check_run
    try:
        check_run(resolved)
    except DataMissing as exc:  # the recipe may be fine; this machine lacks the files
        click.echo(f"note: {exc}; the checks that need the training split were skipped", err=True)
        build_method(resolved, torch.device("cpu"))  # the model's own checks still apply
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 — a plugin's bug, not a refusal of the recipe: show the recipe anyway
        click.echo(f"note: building the run failed ({type(exc).__name__}: {exc}); `rsslctl pretrain` would stop "
                   "there too", err=True)
    click.echo(dumps_toml(resolved.resolved), nl=False)


@recipe.command("list")
def recipe_list() -> None:
    """List the recipes installed with rsslctl (use a name wherever a recipe file is expected)."""
    table = Table(title="shipped recipes")
    table.add_column("name")
    table.add_column("what it is")
    for name, file in shipped_recipes().items():
        first = next((line.lstrip("# ").strip() for line in file.read_text().splitlines() if line.startswith("#")), "")
        table.add_row(name, escape(first))
    console.print(table)


@recipe.command("copy")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing DEST file.")
@user_errors
def recipe_copy(name: str, dest: Path, force: bool) -> None:
    """Copy the shipped recipe NAME to DEST (a file, or a directory to copy it into) to edit it."""
    shipped = shipped_recipes()
    name = name.removesuffix(".toml")
    if name not in shipped:
        raise UserError(f"recipe copy: no shipped recipe '{name}'; available: {', '.join(shipped)}")
    dest = Path(dest) / f"{name}.toml" if Path(dest).is_dir() else Path(dest)
    refuse_existing(dest, "file", force)
    dest.write_text(shipped[name].read_text())
    click.echo(f"wrote {dest}")
