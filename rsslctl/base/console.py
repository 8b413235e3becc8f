"""Console output: rich progress bar and summary tables (stderr for errors is handled by the CLI)."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table

#: rich console for results on stdout (tables, progress)
console = Console()
#: rich console for notes and warnings on stderr
err_console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(quiet: bool = False) -> Iterator[Progress]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                   console=console, disable=quiet, transient=False)
    with bar:
        yield bar


def summary_table(title: str, rows: dict[str, Any]) -> Table:
    """A two-column rich table (bold key, value) with ``title``, e.g. the end-of-run summary."""
    from rich.table import Table
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table
