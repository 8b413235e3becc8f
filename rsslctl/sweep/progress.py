"""Where a sweep stands: one status per run, kept in ``sweep.json``, logged line by line to ``sweep.log`` and shown
live (rich) while the sweep runs."""
from __future__ import annotations

import datetime
import threading
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.live import Live
from rich.text import Text

from rsslctl.run.sweep import LOG, PlannedRun, SweepSpec, write_manifest


class Tracker:
    """Thread-safe statuses of a sweep's runs; every change rewrites the manifest and appends a log line."""

    def __init__(self, out: Path, digest: str, spec: SweepSpec, runs: list[PlannedRun], status: dict[str, str],
                 console: Console | None = None, live: bool = True) -> None:
        self.out, self.digest, self.spec, self.runs = Path(out), digest, spec, runs
        self.status = dict(status)
        self.names = {r.dir: r.name for r in runs}
        self.console = console
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._live_wanted = live and console is not None and console.is_terminal
        self._echo = live and console is not None  # each log line on the console too (above the live line)
        write_manifest(self.out, digest, spec, runs, self.status)

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "running": 0, "failed": 0, "left": 0}
        for run in self.runs:
            s = self.status.get(run.dir, "pending")
            out[s if s in out else "left"] += 1
        return out

    def line(self) -> str:
        c = self.counts()
        return f"{c['done']} done · {c['running']} running · {c['failed']} failed · {c['left']} left"

    def log(self, message: str) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with open(self.out / LOG, "a") as fh:
            fh.write(f"{stamp} {message}\n")
        if self._echo:
            self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def set(self, run: str, status: str, note: str = "") -> None:
        with self._lock:
            if self.status.get(run) == status and not note:
                return
            self.status[run] = status
            write_manifest(self.out, self.digest, self.spec, self.runs, self.status)
            self.log(f"{self.names[run]} ({run}) {status}{': ' + note if note else ''} [{self.line()}]")
            self._refresh()

    def _render(self) -> Text:
        return Text.assemble(("sweep ", "bold"), self.line(), f"   ({self.out / LOG})")

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)

    def __enter__(self) -> "Tracker":
        if self._live_wanted:
            # the sweep's own console: the verbs' output goes to the runs' logs, not through this display
            self._live = Live(self._render(), console=self.console, redirect_stdout=False, redirect_stderr=False,
                              auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def failed(self) -> Iterator[str]:
        return (self.names[r] for r, s in self.status.items() if s == "failed")
