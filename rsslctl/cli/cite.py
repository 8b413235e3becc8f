"""`rsslctl cite RUN_DIR`: the BibTeX of every method, attack, backbone, dataset and selector a run used."""
from __future__ import annotations

from pathlib import Path

import click

from rsslctl.base import registry
from rsslctl.cli.common import user_errors
from rsslctl.run.directory import load_run_recipe
from rsslctl.run.recipe import OFF, PLUGIN_TABLES, Recipe

SELF = ("@software{rsslctl, title={rsslctl: robust self-supervised learning, one tool}, author={{rsslctl authors}}, "
        "version={0.1.0}, year={2026}}")


def format_bibtex(entry: str) -> str:
    """One field per line: ``@type{key, a={x}, b={y}}`` → the usual multi-line layout."""
    head, _, body = entry.strip().partition("{")
    fields, depth, cur = [], 0, ""
    for ch in body[:-1]:  # drop the closing brace of the entry
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            fields.append(cur.strip())
            cur = ""
        else:
            cur += ch
    fields.append(cur.strip())
    key, rest = fields[0], [f for f in fields[1:] if f]
    return head + "{" + key + ",\n" + ",\n".join(f"  {f}" for f in rest) + "\n}"


def run_citations(recipe: Recipe) -> list[tuple[str, str]]:
    """(what, BibTeX) for each plugin the recipe uses, plus the evaluation attacks; duplicates once."""
    reg = registry.registry()  # citations are declared: no plugin module is imported for them
    used = [(kind, getattr(recipe, slot).name) for kind, slot in PLUGIN_TABLES.values()
            if getattr(recipe, slot) is not None and getattr(recipe, slot) is not OFF]
    used = [(f"{kind} '{name}'", reg.info(kind, name).citation) for kind, name in used]
    for name in (recipe.evaluation.attack, recipe.evaluation.single_step_attack):
        used.append((f"evaluation attack '{name}'", reg.info("attack", name).citation))
    out: dict[str, list[str]] = {}
    for what, citation in used:
        if citation:
            out.setdefault(citation, []).append(what)
    return [(", ".join(whats), bib) for bib, whats in out.items()]


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@user_errors
def cite(run_dir: Path) -> None:
    """Print the BibTeX of the methods, attacks, backbone and datasets RUN_DIR used (and of rsslctl)."""
    for what, bib in run_citations(load_run_recipe(run_dir, load_plugins=False)):
        click.echo(f"% {what}\n{format_bibtex(bib)}\n")
    click.echo(f"% the toolkit\n{format_bibtex(SELF)}")
