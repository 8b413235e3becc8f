"""`rsslctl plugins` and `rsslctl recipe show`: what is installed, and what a recipe resolves to."""
from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from ..options import describe
from ..recipe import dumps_toml, load
from ..registry import registry
from ..ui import console
from .common import SET, user_errors


@click.command()
@click.option("--options", "show_options", is_flag=True, help="Also list every plugin's options and defaults.")
@user_errors
def plugins(show_options: bool) -> None:
    """List installed plugins: kind, name, package, version, description (broken ones with their error)."""
    table = Table(title="rsslctl plugins")
    for col in ("kind", "name", "package", "version", "description"):
        table.add_column(col)
    for info in registry().all():
        desc = f"[red]{'failed to load: ' if info.cls is None else ''}{escape(info.error)}[/]" if info.error else escape(info.doc)
        table.add_row(info.kind, info.name, info.package, info.version, desc)
        if show_options and info.cls is not None:
            for name, tname, default, help_ in describe(info.cls.Options):
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
    """Print the fully resolved recipe (all defaults filled in) after validation."""
    click.echo(dumps_toml(load(recipe_file, list(overrides)).resolved), nl=False)
