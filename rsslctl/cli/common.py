"""What several verbs share: the one-line error handling, ``--set``, and the evaluation suite's flags."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import click
from rich.markup import escape

from rsslctl.base.errors import UserError
from rsslctl.base.limits import MAX_BATCH, MAX_INT, MAX_SEED, MAX_STEPS, check_number
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


def suite_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Flags of the evaluation suite (shared by `evaluate --mode` and `finetune`)."""
    opts = [
        click.option("--eps", default="8/255", show_default=True, help="Attack radius (L∞: e.g. 8/255; L2: e.g. 0.5)."),
        click.option("--step-size", default="2/255", show_default=True, help="PGD step size."),
        click.option("--pgd-steps", default=20, show_default=True, type=click.IntRange(1), help="PGD iterations."),
        click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True, help="Threat model."),
        click.option("--fgsm/--no-fgsm", default=True, show_default=True, help="Also report FGSM accuracy."),
        click.option("--autoattack", is_flag=True, help="Run AutoAttack (pyautoattack); resumable through its state file."),
        click.option("--aa-version", type=click.Choice(["standard", "plus", "rand", "custom"]), default="standard",
                     show_default=True, help="AutoAttack version (custom needs --aa-attacks)."),
        click.option("--aa-attacks", default="", help="Custom AutoAttack list, e.g. apgd-ce,apgd-t,fab-t,square."),
        click.option("--aa-limit", default=0, type=click.IntRange(0), help="AutoAttack on a seeded random subset of N test images (0 = all)."),
        click.option("--aa-batch", default=128, show_default=True, type=click.IntRange(1), help="AutoAttack batch size."),
        click.option("--corruptions", is_flag=True, help="Common corruptions: CIFAR-10-C/100-C files if present, else generated."),
        click.option("--corruption-dir", default="", help="Folder with the CIFAR-C .npy files (default: data root)."),
        click.option("--corruption-limit", default=0, type=click.IntRange(0), help="First N images per severity (0 = all)."),
        click.option("--eps-curve", default="0,1,2,4,8,16", show_default=True,
                     help="ε values for the accuracy-vs-ε plot (L∞ in 1/255 units; '' = none)."),
        click.option("--test-limit", default=0, type=click.IntRange(0), help="Evaluate on the first N test images (0 = all)."),
        click.option("--eval-seed", default=0, type=click.IntRange(0), show_default=True, help="Seed of attacks and subsets."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def suite_from_flags(kw: dict[str, Any]) -> Any:
    from rsslctl.eval.suite import SuiteOptions
    scale = 255 if kw["norm"] == "linf" else 1
    try:
        curve = tuple(float(v) / scale for v in kw["eps_curve"].split(",") if v.strip())
    except ValueError:
        raise UserError(f"--eps-curve: expected numbers separated by commas, got {kw['eps_curve']!r}") from None
    attacks = tuple(a.strip() for a in kw["aa_attacks"].split(",") if a.strip())
    bad = [a for a in attacks if a not in ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")]
    if bad:
        raise UserError(f"--aa-attacks: unknown attack {bad[0]!r}; choose from apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square")
    if attacks and kw["aa_version"] != "custom":
        raise UserError("--aa-attacks needs --aa-version custom")
    for value in curve:
        check_number(value, "--eps-curve", 0, None)
    for flag, hi in (("pgd_steps", MAX_STEPS), ("aa_limit", MAX_INT), ("aa_batch", MAX_BATCH),
                     ("corruption_limit", MAX_INT), ("test_limit", MAX_INT), ("eval_seed", MAX_SEED)):
        check_number(kw[flag], "--" + flag.replace("_", "-"), 0, hi)
    check_number(parse_eps(kw["eps"]), "--eps", 0, None)
    check_number(parse_eps(kw["step_size"], "--step-size"), "--step-size", 0, None)
    return SuiteOptions(eps=parse_eps(kw["eps"]), step_size=parse_eps(kw["step_size"], "--step-size"), pgd_steps=kw["pgd_steps"], norm=kw["norm"],
                        fgsm=kw["fgsm"], autoattack=kw["autoattack"], aa_version=kw["aa_version"], aa_attacks=attacks,
                        aa_limit=kw["aa_limit"], aa_batch=kw["aa_batch"], corruptions=kw["corruptions"],
                        corruption_dir=kw["corruption_dir"], corruption_limit=kw["corruption_limit"], eps_curve=curve,
                        test_limit=kw["test_limit"], seed=kw["eval_seed"])



def show_report(report: dict[str, Any], out_dir: Path, as_json: bool) -> None:
    import json

    from rsslctl.eval.suite import report_table
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    console.print(report_table(report))
    console.print(f"saved to {Path(out_dir) / 'evaluation' / 'report.json'}")
