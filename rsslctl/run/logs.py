"""Experiment logs of a run: TensorBoard event files (default), a CSV beside ``metrics.jsonl``, optionally Weights &
Biases (also offline), and plain progress lines when the output is not a terminal (batch jobs, redirected logs).

The engine hands over values it has already read back from the device (every ``log_every`` steps), so logging
never adds a host sync to a step.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal

from rsslctl.base.console import console
from rsslctl.base.errors import UserError
from rsslctl.base.options import opt


@dataclasses.dataclass
class LoggingOptions:
    """The recipe's [logging] table."""

    tensorboard: bool = opt(True, "write TensorBoard event files into <run>/tensorboard")
    csv: bool = opt(True, "write <run>/metrics.csv (one row per logged step) next to metrics.jsonl")
    wandb: bool = opt(False, "log to Weights & Biases (needs the `wandb` package: pip install rsslctl[wandb])")
    wandb_project: str = opt("rsslctl", "W&B project")
    wandb_mode: Literal["offline", "online"] = opt("offline", "offline: write <run>/wandb to sync later")
    knn_every: int = opt(0, "kNN accuracy on frozen features every N epochs (0 = off)", min=0)
    probe_every: int = opt(0, "linear-probe accuracy on frozen features every N epochs (0 = off)", min=0)
    monitor_limit: int = opt(2000, "images of each split used by the kNN / probe monitors (0 = all)", min=0)
    plain_every_minutes: float = opt(5.0, "without a terminal: a progress line at least this often inside an epoch",
                                     min=0.1, max=1e6)


def main_only(logging: LoggingOptions) -> LoggingOptions:
    """The [logging] options on rank 0; on the other ranks the same with every writer switched off."""
    from rsslctl.runtime.distributed import is_main  # torch: only when a run starts, not for recipe checks
    return logging if is_main() else dataclasses.replace(logging, tensorboard=False, csv=False, wandb=False)


def check_logging(options: LoggingOptions) -> None:
    """Refuse, before a run directory exists, a logger whose package is missing (only found out on opening it)."""
    import importlib.util
    if options.wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("logging.wandb = true, but the `wandb` package is not installed; pip install wandb, or set "
                        "logging.wandb = false")


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return (f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600
            else f"{seconds // 60}m{seconds % 60:02d}s")


def regular_log(path: Path) -> bool:
    """Whether a log file exists; one line when it is something other than a regular file (a link to a device
    such as /dev/full or /dev/zero would fill the disk or never end when read back)."""
    if not (path.exists() or path.is_symlink()):
        return False
    if not path.is_file():
        raise UserError(f"{path}: not a regular file (a link to a device or a folder?); move it away, then retry")
    return True


def filter_csv(path: Path, keep: Callable[[dict[str, str]], bool], fields: list[str] | None = None) -> list[str]:
    """Rewrite the CSV log ``path`` atomically with only the rows ``keep`` accepts, streaming row by row (a log of
    any length costs one row of memory); ``fields`` extends its header. Returns the header."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(path, newline="", encoding="utf-8") as src, open(tmp, "w", newline="", encoding="utf-8") as dst:
            reader = csv.DictReader(src)
            header = list(dict.fromkeys([*(reader.fieldnames or []), *(fields or [])]))
            writer = csv.DictWriter(dst, header)
            writer.writeheader()
            writer.writerows(row for row in reader if keep(row))
    except (UnicodeDecodeError, csv.Error) as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: not a CSV log this run wrote ({type(exc).__name__}: {str(exc)[:80]}); move it "
                        "away, then retry") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return header


#: longest line of a JSON-lines log this run wrote (a record is a few hundred bytes)
MAX_JSONL_LINE = 1 << 20


def filter_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite the JSON-lines log ``path`` atomically with the records ``keep`` accepts, streaming line by line (a
    log of any length costs one line of memory, at most ``MAX_JSONL_LINE`` bytes). Lines that are not a JSON object
    (the partial last line of a killed run) are dropped; no log, nothing to do. One line (UserError) for a file that
    is not regular, or one this run did not write (undecodable, or a line longer than the limit)."""
    if not regular_log(path):
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            while line := src.readline(MAX_JSONL_LINE + 1):
                if len(line) > MAX_JSONL_LINE:
                    raise ValueError(f"a line longer than {MAX_JSONL_LINE} bytes")
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    raise
                except ValueError:
                    continue
                if isinstance(record, dict) and keep(record):
                    dst.write(line.rstrip(b"\r\n") + b"\n")
            dst.flush()
            os.fsync(dst.fileno())
    except (UnicodeDecodeError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: not a metrics log this run wrote ({type(exc).__name__}: {str(exc)[:80]}); move it "
                        "away, then retry") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


class CsvLog:
    """One CSV file whose header grows when a row brings a new column (rare: a monitor's first value). Rows are
    appended as they come; only a new column rewrites the file, streaming it."""

    def __init__(self, path: Path, purge_step: int) -> None:
        self.path = path
        if regular_log(path):  # a resumed run: drop what was written after the checkpoint it resumes from
            self.fields = filter_csv(path, lambda r: (r.get("step") or "").isdigit() and int(r["step"]) < purge_step)
        else:
            self.fields = []
            path.write_text("\n")

    def write(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.fields]
        if new:
            self.fields = filter_csv(self.path, lambda r: True, new)
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, self.fields).writerow(row)


class RunLogger:
    """Writers of one run; ``scalars`` for every logged step or epoch value, ``progress`` for humans. On resume,
    ``purge_step`` (the first step not covered by the checkpoint) drops later records, as in metrics.jsonl."""

    def __init__(self, run_dir: Path, options: LoggingOptions, resolved: dict[str, Any], quiet: bool,
                 purge_step: int = 0) -> None:
        self.o, self.quiet = options, quiet
        self.plain = not sys.stdout.isatty() and not quiet  # a batch job: plain lines instead of a live bar
        self._last_plain = time.perf_counter()
        self.tb = self.wandb = None
        self.csv: dict[str, CsvLog] = {}
        run_dir = Path(run_dir)
        if options.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step or None)
            self.tb.add_text("recipe", "```\n" + "\n".join(f"{k} = {v}" for k, v in _flat("", resolved, {}).items())
                             + "\n```")
        if options.csv:
            self.csv = {group: CsvLog(run_dir / name, purge_step) for group, name in (("train", "metrics.csv"),
                                                                                     ("epoch", "epochs.csv"))}
        if options.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("logging.wandb = true, but the `wandb` package is not installed; "
                                "pip install wandb, or set logging.wandb = false") from None
            self.wandb = wandb.init(project=options.wandb_project, mode=options.wandb_mode, dir=str(run_dir),
                                    config=_flat("", resolved, {}), name=run_dir.name, resume="allow")

    def scalars(self, values: dict[str, float], step: int, group: str) -> None:
        """Log finite numbers under ``group/name`` (TensorBoard, W&B) and as one CSV row of ``group``."""
        values = {k: v for k, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{group}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{group}/{k}": v for k, v in values.items()}, step=step)
        if group in self.csv:
            self.csv[group].write({"step": step, **values})

    def progress(self, text: str, force: bool = False) -> None:
        """A plain line for non-terminal output: at every epoch end (``force``) and every few minutes within one."""
        now = time.perf_counter()
        if self.plain and (force or now - self._last_plain >= 60 * self.o.plain_every_minutes):
            console.print(text, highlight=False, soft_wrap=True)
            self._last_plain = now

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
