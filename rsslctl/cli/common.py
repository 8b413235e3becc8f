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

from rsslctl.base.errors import UserError
from rsslctl.base.limits import check_number


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    from rich.markup import escape  # rich is imported when there is something to print: `--help` stays cheap

    from rsslctl.base.console import err_console
    err_console.print(f"[bold red]error:[/] {escape(_one_line(message))}", highlight=False, soft_wrap=True)
    if _launched() and _writes_to_fd2():  # torch's teardown of a process group whose peer is gone can still warn
        sys.stderr.flush()  # on stderr: the line above stays the last
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    sys.exit(code)


def _writes_to_fd2() -> bool:
    """sys.stderr is the process's standard error (not a stream a caller captures in memory)."""
    try:
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False


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
    torch = sys.modules.get("torch")
    if torch is None:  # not imported: the error cannot be torch's
        return False
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure of a verb ends in one line: UserError and OS errors (disk full, read-only, permissions) exit
    with code 2, an interrupt (SIGINT or SIGTERM) with 128 + the signal, anything unexpected with 1. A rank of a
    multi-process run also records its line for the launcher (``rsslctl.runtime.launch``); a rank that ``launch``
    started prints nothing itself, since the launcher prints every rank's line."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _mute_other_ranks()  # under torchrun only rank 0 prints, errors included
        try:
            with interrupts_as_keyboard_interrupt():
                out = fn(*args, **kwargs)
            distributed = sys.modules.get("rsslctl.runtime.distributed")
            if distributed is not None:  # not imported = no process group to leave (and no torch to import)
                distributed.shutdown()
            return out
        except UserError as exc:
            if getattr(exc, "lines", None):  # the launcher: one line per failing rank
                fail_lines(exc.lines, exc.exit_code)
            _rank_fail(str(exc), exc.exit_code, exc)
        except KeyboardInterrupt as exc:
            from rsslctl.base.console import err_console
            signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
            name = signal.Signals(signum).name
            if not _launched_child():  # the launcher says it once, for every rank
                ctx = click.get_current_context(silent=True)
                verb = ctx.info_name if ctx is not None else ""
                advice = ("whatever was checkpointed is kept: continue a pretraining run with "
                          "`rsslctl pretrain --resume "
                          "RUN_DIR`") if verb in ("pretrain", "", None) else \
                    f"`rsslctl {verb}` wrote nothing unfinished and kept earlier results; run it again to finish"
                err_console.print(f"interrupted ({name}); {advice}", highlight=False, soft_wrap=True)
            sys.exit(128 + signum)
        except OSError as exc:
            _rank_fail(os_error_message(exc), 2, exc)
        except RecursionError as exc:
            _rank_fail("input nested too deeply to process", 2, exc)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 — one line, never a traceback; RSSLCTL_TRACEBACK=1 shows it
            if os.environ.get("RSSLCTL_TRACEBACK"):
                raise
            if _out_of_memory(exc):
                _rank_fail(f"out of memory ({_one_line(exc)[:200]}); lower schedule.batch_size, data.image_size or "
                           "data.limit", 2, exc)
            lost = _lost_peer(exc)
            if lost:
                _rank_fail(lost, 1, exc)
            _rank_fail(f"internal error: {type(exc).__name__}: {exc} (please report it; RSSLCTL_TRACEBACK=1 shows "
                       "the traceback)", 1, exc)
    return wrapper


def _mute_other_ranks() -> None:
    """``distributed.mute_other_ranks`` without importing torch when no launcher started this process."""
    if _launched():
        from rsslctl.runtime import distributed
        distributed.mute_other_ranks()


def _launched() -> bool:
    """A launcher (torchrun, ``launch``) started this process; checked without importing torch."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _launched_child() -> bool:
    if not _launched():
        return False
    from rsslctl.runtime import distributed
    from rsslctl.runtime.launch import CHILD_ENV
    return distributed.launched() and bool(os.environ.get(CHILD_ENV))


#: what gloo and NCCL errors of a collective say (plain RuntimeErrors) when the other side is gone or silent
_PEER_MARKERS = ("gloo/transport", "Connection closed by peer", "Connection reset by peer", "Timed out", "NCCL")


def _lost_peer(exc: Exception) -> str:
    """The line for a collective that failed because another rank did (or stalled), else ''."""
    if "torch" not in sys.modules:  # torch never imported: no collective ran
        return ""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return ""
    if not (isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError)
                                                and any(m in str(exc) for m in _PEER_MARKERS))):
        return ""
    import re
    what = re.sub(r"\[[^\]]*\]\s*", "", _one_line(exc)).split(". ")[0][:120]  # gloo's source location dropped
    return (f"lost the other ranks in a collective ({what}): another rank failed (see its line) or stalled for "
            "longer than engine.collective_timeout_s")


def _rank_fail(message: str, code: int, exc: BaseException) -> None:
    """``fail``, after recording the line for the launcher (under torchrun or ``launch``). An error that only
    echoes another rank's (``secondary``) or that every rank raises about one rank (``rank``) is recorded as such."""
    if _launched():
        from rsslctl.runtime.launch import record_failure
        about = getattr(exc, "rank", None)
        secondary = bool(getattr(exc, "secondary", False)) or (isinstance(exc, Exception) and bool(_lost_peer(exc)))
        if about is not None:
            secondary = about != int(os.environ.get("RANK", "0"))
        record_failure(_one_line(message), code, secondary, about)
        if _launched_child():
            sys.exit(code)
    fail(message, code)


def fail_lines(lines: list[str], code: int) -> None:
    """Several ``error:`` lines (one per failing rank), then exit with ``code``."""
    from rich.markup import escape

    from rsslctl.base.console import err_console
    for line in lines[:-1]:
        err_console.print(f"[bold red]error:[/] {escape(_one_line(line))}", highlight=False, soft_wrap=True)
    fail(lines[-1], code)


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
    from rsslctl.eval.options import SuiteOptions
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
    from rsslctl.eval.options import SuiteOptions
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

    from rsslctl.base.console import console
    from rsslctl.eval.suite import report_table
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    console.print(report_table(report))
    console.print(f"saved to {Path(report.get('folder') or Path(out_dir) / 'evaluation') / 'report.json'}")


# -- many processes: `--nproc-per-node N` ---------------------------------------------------------------------------
class LaunchCommand(click.Command):
    """A verb that can start its own ranks: keeps its raw arguments, which the launcher hands to every rank."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["rsslctl.argv"] = list(args)
        return super().parse_args(ctx, args)


def launch_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--nproc-per-node, --nnodes, --node-rank, --rdzv-endpoint (read with ``launch_spec``)."""
    for decl, kind, text in reversed([
            ("--nproc-per-node", click.IntRange(1), ("Run as N processes on this machine (one per GPU), started by "
             "torch's elastic launcher as torchrun would; the recipe is checked once before any starts.")),
            ("--nnodes", click.IntRange(1), "Number of machines (with --nproc-per-node; default 1)."),
            ("--node-rank", click.IntRange(0), ("This machine's rank 0 … nnodes-1 (optional: by default the "
             "rendezvous numbers the machines).")),
            ("--rdzv-endpoint", str, "HOST:PORT where the machines meet (one of them; the same on every machine).")]):
        fn = click.option(decl, type=kind, default=None, help=text)(fn)
    return fn


def launch_spec(nproc_per_node: int | None, nnodes: int | None, node_rank: int | None,
                rdzv_endpoint: str | None) -> Any:
    """The ``LaunchSpec`` of the flags, or None: no --nproc-per-node, or this process is a rank the launcher
    started (which runs the verb itself)."""
    if nproc_per_node is None:
        if nnodes is not None or node_rank is not None or rdzv_endpoint:
            raise UserError("--nnodes, --node-rank and --rdzv-endpoint go with --nproc-per-node N")
        return None
    from rsslctl.runtime.launch import CHILD_ENV, LaunchSpec
    if _launched():
        if os.environ.get(CHILD_ENV):
            return None
        raise UserError("--nproc-per-node under torchrun would start processes twice; run either `rsslctl ... "
                        "--nproc-per-node N` or `torchrun ... rsslctl ...` without it")
    return LaunchSpec(nproc_per_node, nnodes or 1, node_rank, rdzv_endpoint or "")


def start_ranks(spec: Any, join_timeout_s: int) -> None:
    """Run the current verb, with the arguments it was given, as the ranks of ``spec`` (see ``runtime.launch``)."""
    from rsslctl.runtime.launch import launch
    ctx = click.get_current_context()
    launch([ctx.info_name, *ctx.meta["rsslctl.argv"]], dataclasses.replace(spec, join_timeout_s=join_timeout_s))
