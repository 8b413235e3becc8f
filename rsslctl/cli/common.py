"""What several verbs share: the one-line error handling, ``--set``, and the evaluation suite's flags."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import click
from rich.markup import escape

from rsslctl.base.errors import UserError
from rsslctl.base.limits import check_number
from rsslctl.base.console import console, err_console


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {escape(_one_line(message))}", highlight=False, soft_wrap=True)
    sys.exit(code)


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system error: the file, what went wrong, and what to do about it."""
    import errno
    where = f"{exc.filename}: " if exc.filename else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    advice = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (quota exceeded)",
              errno.EROFS: "choose a writable location", errno.EACCES: "check the permissions",
              errno.EPERM: "check the permissions"}.get(exc.errno or 0, "")
    return f"{where}{what}" + (f"; {advice}, then retry (a run continues with --resume)" if advice else "")


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    import torch
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure of a verb ends in one line: UserError and OS errors (disk full, read-only, permissions) exit
    with code 2, an interrupt (SIGINT or SIGTERM) with 128 + the signal, anything unexpected with 1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rsslctl.runtime import distributed
        distributed.mute_other_ranks()  # under torchrun only rank 0 prints, errors included
        try:
            with interrupts_as_keyboard_interrupt():
                out = fn(*args, **kwargs)
            distributed.shutdown()
            return out
        except UserError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt as exc:
            signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
            name = signal.Signals(signum).name
            err_console.print(f"interrupted ({name}); whatever was checkpointed is kept: continue a pretraining run "
                              "with `rsslctl pretrain --resume RUN_DIR`", highlight=False, soft_wrap=True)
            sys.exit(128 + signum)
        except OSError as exc:
            fail(os_error_message(exc))
        except RecursionError:
            fail("input nested too deeply to process")
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 — one line, never a traceback; RSSLCTL_TRACEBACK=1 shows it
            if os.environ.get("RSSLCTL_TRACEBACK"):
                raise
            if _out_of_memory(exc):
                fail(f"out of memory ({_one_line(exc)[:200]}); lower schedule.batch_size, data.image_size or "
                     "data.limit")
            fail(f"internal error: {type(exc).__name__}: {exc} (please report it; RSSLCTL_TRACEBACK=1 shows the "
                 "traceback)", 1)
    return wrapper


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM is handled like SIGINT (a KeyboardInterrupt carrying the signal number), so a killed run stops the
    same way: message, exit code 128 + signal, resumable."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signum)
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


SET = click.option("--set", "overrides", multiple=True, metavar="KEY.SUB=VALUE",
                   help="Override a recipe value, e.g. --set schedule.epochs=5 (repeatable).")


def parse_eps(text: str, flag: str = "--eps") -> float:
    from rsslctl.base.options import parse_number
    return parse_number(text.strip(), flag)


def _flag(s: Any) -> tuple[str, str]:
    """(click declaration, parameter name) of a suite setting's flag."""
    flag = s.flag or "--" + s.name.replace("_", "-")
    if s.kind == "switch":
        return f"{flag}/--no-{flag[2:]}", flag[2:].replace("-", "_")
    return flag, flag[2:].replace("-", "_")


def _flag_default(s: Any) -> Any:
    """A setting's default as its flag is written: fractions of 1/255 for radii, the ε-curve in 1/255 units."""
    def eps(v: float) -> str:
        n = v * 255
        return f"{round(n)}/255" if abs(n - round(n)) < 1e-9 and n else f"{v:g}"
    if s.kind == "eps":
        return eps(s.default)
    if s.kind == "eps_list":
        return ",".join(f"{v * 255:g}" for v in s.default)
    if s.kind == "names":
        return ",".join(s.default)
    return s.default


def _suite_settings() -> list[Any]:
    from rsslctl.eval.metrics import declared
    from rsslctl.eval.suite import SuiteOptions
    return [s for s in declared(SuiteOptions) if s.flag != "-"]


def suite_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Flags of the evaluation suite (shared by `evaluate --mode` and `finetune`), one per declared setting of
    ``SuiteOptions`` and of the registered metrics (``rsslctl.eval.metrics``)."""
    types: dict[str, Any] = {"choice": None, "text": str, "names": str, "eps": str, "eps_list": str}
    for s in reversed(_suite_settings()):
        decl, param = _flag(s)
        if s.kind == "flag":
            fn = click.option(decl, param, is_flag=True, help=s.help)(fn)
            continue
        kind = click.IntRange(s.lo) if s.kind == "int" else click.Choice(list(s.choices)) if s.kind == "choice" \
            else types.get(s.kind)
        fn = click.option(decl, param, default=_flag_default(s), type=kind, show_default=s.show_default,
                          help=s.help)(fn)
    return fn


def suite_from_flags(kw: dict[str, Any]) -> Any:
    """The ``SuiteOptions`` of the suite's flags (``kw`` holds them by parameter name), each checked."""
    from rsslctl.eval.suite import SuiteOptions
    scale = 255 if kw["norm"] == "linf" else 1
    fields = {f.name for f in dataclasses.fields(SuiteOptions)}
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for s in _suite_settings():
        flag, param = _flag(s)[0].split("/")[0], _flag(s)[1]
        raw = kw[param]
        if s.kind == "eps":
            value = parse_eps(raw, flag)
            check_number(value, flag, 0, None)
        elif s.kind == "eps_list":
            try:
                value = tuple(float(v) / scale for v in raw.split(",") if v.strip())
            except ValueError:
                raise UserError(f"{flag}: expected numbers separated by commas, got {raw!r}") from None
            for v in value:
                check_number(v, flag, 0, None)
        elif s.kind == "names":
            value = tuple(a.strip() for a in raw.split(",") if a.strip())
            bad = [a for a in value if a not in s.choices]
            if bad:
                raise UserError(f"{flag}: unknown attack {bad[0]!r}; choose from {', '.join(s.choices)}")
        elif s.kind == "int":
            value = raw
            check_number(value, flag, 0, s.hi)
        else:
            value = raw
        (values if s.name in fields else extra)[s.name] = value
    opts = SuiteOptions(**values, extra=extra)
    opts.check()
    return opts


def show_report(report: dict[str, Any], out_dir: Path, as_json: bool) -> None:
    import json

    from rsslctl.eval.suite import report_table
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    console.print(report_table(report))
    console.print(f"saved to {Path(report.get('folder') or Path(out_dir) / 'evaluation') / 'report.json'}")
