"""`rsslctl compare`: runs and sweeps side by side, mean ± std and a 95 % interval over seeds."""
from __future__ import annotations

import io
from pathlib import Path

import click

from rsslctl.base.console import console
from rsslctl.base.errors import UserError
from rsslctl.cli.common import user_errors
from rsslctl.eval.compare import SWEEP_FILE, compare
from rsslctl.eval.report import FORMATS, WRITERS, table
from rsslctl.run.directory import RECIPE_FILE, check_output
from rsslctl.runtime.checkpoint import atomic_write_text


@click.command("compare")
@click.argument("paths", nargs=-1, required=True, metavar="RUN_OR_SWEEP...", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table (terminal), markdown, csv, json, latex (booktabs) or html (one offline file).")
@click.option("--out", type=click.Path(path_type=Path), help="Write to this file instead of standard output.")
@click.option("--columns", metavar="KEY,…",
              help="Recipe keys and evaluation settings to show as columns, comma-separated ('none' for none; "
                   "default: every one that differs between rows). Rows are grouped by the whole recipe either way.")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@user_errors
def compare_command(paths: tuple[Path, ...], fmt: str, out: Path | None, columns: str | None, force: bool) -> None:
    """Compare the evaluations of run directories and sweep directories (RUN_OR_SWEEP…): runs whose recipes differ
    only in run.seed form a group; per group and evaluation setting, mean ± std and a 95 % Student-t interval."""
    if out is not None:  # checked before anything is read, so a refusal costs nothing
        # a new file beside the runs is fine (e.g. into the sweep directory); never over a file compare reads
        reads = [p / name for p in paths for name in (RECIPE_FILE, SWEEP_FILE, "metrics.jsonl", "eval.json", "eval",
                                                       "evaluation", "checkpoints")]
        check_output(out, reads, "--out file", force)
        if fmt == "html" and out.suffix.lower() not in (".html", ".htm"):
            raise UserError(f"--out {out}: name an .html file for --format html")
    chosen = None if columns is None else [c.strip() for c in columns.split(",") if c.strip() not in ("", "none")]
    result = compare(paths, chosen)
    if fmt == "table":
        if out is None:
            console.print(table(result))
            return
        buf = io.StringIO()
        from rich.console import Console
        Console(file=buf, width=200, color_system=None).print(table(result))
        text = buf.getvalue()
    else:
        text = WRITERS[fmt](result)
    if out is None:
        click.echo(text, nl=False)
        return
    atomic_write_text(out, text)
    console.print(f"wrote {out} ({fmt}, {len(result['rows'])} rows)")
