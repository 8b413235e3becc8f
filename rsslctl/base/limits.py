"""The one place that says which values are absurd: non-finite numbers, integers no tensor or seed can hold,
sizes and allocations this machine cannot provide, names that are not a single safe path component.

``options.validate`` applies ``check_number`` to every option of every table (plugins included) and
``recipe.resolve`` applies ``check_recipe`` to the relations between tables, so a bad value is refused with its key
and its allowed range before any directory is created or any tensor allocated.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any

from rsslctl.base.errors import UserError

#: the largest integer any option may hold: exact in float64 and in every seed generator we use
MAX_INT = 2**53
#: the largest magnitude a float option may hold (anything beyond is a typo or an attack on the tool)
MAX_FLOAT = 1e15
#: run.seed must be < 2**32: seeds are derived as seed * 1_000_003 + index and must stay inside 64 bits
MAX_SEED = 2**32 - 1
#: ceilings of the size keys (inclusive); beyond them a run cannot finish on any machine this tool targets
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_STEPS = 100_000
#: the largest image side (pixels) a recipe may ask for; larger sizes are refused as absurd
MAX_IMAGE_SIZE = 1024
#: option names (in model_kwargs tables) through which a backbone library could load a file, i.e. unpickle
_FILE_KEYS = re.compile(r"checkpoint|pretrained|path|file|url|cache|weights|hub|load", re.I)
#: a run name: one path component, no separators, no control characters, not hidden, at most 100 characters
_RUN_NAME = re.compile(r"[^/\\\x00-\x1f\x7f.][^/\\\x00-\x1f\x7f]{0,99}")


def check_number(value: Any, loc: str, lo: float | None = None, hi: float | None = None) -> None:
    """UserError when ``value`` (an int or float option, or an element of a list option) is non-finite, larger
    than any option may be, or outside [lo, hi]; the message names the key and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    span = f"[{_fmt(lo, -MAX_INT if isinstance(value, int) else -MAX_FLOAT)}, " \
           f"{_fmt(hi, MAX_INT if isinstance(value, int) else MAX_FLOAT)}]"
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{loc}: {value} is not a finite number; allowed range {span}")
    if abs(value) > (MAX_INT if isinstance(value, int) else MAX_FLOAT):
        raise UserError(f"{loc}: {_short(value)} is out of range; allowed range {span}")
    if lo is not None and value < lo:
        raise UserError(f"{loc}: {_short(value)} is below the minimum {lo}; allowed range {span}")
    if hi is not None and value > hi:
        raise UserError(f"{loc}: {_short(value)} is above the maximum {hi}; allowed range {span}")


def check_nested(value: Any, loc: str, depth: int = 0) -> None:
    """Finite numbers everywhere inside a list/table option, and at most 8 levels of nesting."""
    if depth > 8:
        raise UserError(f"{loc}: nested more than 8 levels deep")
    if isinstance(value, dict):
        for k, v in value.items():
            check_nested(v, f"{loc}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_nested(v, f"{loc}[{i}]", depth + 1)
    else:
        check_number(value, loc)


def _fmt(bound: float | None, default: float) -> str:
    return _short(bound if bound is not None else default)


def _short(value: float) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else f"{value:.3g}"


def check_run_name(name: str, loc: str) -> None:
    """A run name is one safe path component: the run directory is always <output_dir>/<name>, never elsewhere."""
    if not _RUN_NAME.fullmatch(name or ""):
        raise UserError(f"{loc}: {name[:40]!r}{'…' if len(name) > 40 else ''} is not a valid run name; use 1-100 "
                        "characters without '/', '\\' or control characters, not starting with '.'")


def check_path_text(path: str, loc: str) -> None:
    """A path option: no NUL or control characters, at most 4096 characters."""
    if len(path) > 4096 or any(ord(c) < 32 for c in path):
        raise UserError(f"{loc}: not a usable path (control characters or longer than 4096 characters)")


def check_model_kwargs(kwargs: dict[str, Any], loc: str) -> None:
    """Backbone keyword arguments may shape a model but never make its library read a file (timm's
    ``checkpoint_path`` / ``pretrained`` would unpickle one): such keys are refused."""
    for key in kwargs:
        if _FILE_KEYS.search(str(key)):
            raise UserError(f"{loc}.{key}: refused: keyword arguments that make the backbone library load a file or "
                            "download weights could unpickle code; use the backbone's safetensors weights option")
    check_nested(kwargs, loc)


def memory_bytes() -> int:
    """Physical memory of this machine (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_allocation(nbytes: int, what: str, fix: str) -> None:
    """UserError before allocating ``nbytes`` when it exceeds half of this machine's memory."""
    total = memory_bytes()
    if total and nbytes > total // 2:
        raise UserError(f"{what} would need {nbytes / 2**30:,.1f} GiB, more than half of the "
                        f"{total / 2**30:,.1f} GiB of memory here; {fix}")


def check_recipe(parts: dict[str, Any], where: str) -> None:
    """Relations between options that each validate alone."""
    run, data, encoder = parts["run"], parts["data"], parts.get("encoder")
    check_run_name(run.name, f"{where}: run.name")
    check_path_text(run.output_dir, f"{where}: run.output_dir")
    check_path_text(data.root, f"{where}: data.root")
    if encoder is not None and min(encoder.std) <= 0:
        raise UserError(f"{where}: encoder.std = {list(encoder.std)}: every value must be > 0 (it divides the input)")
    optimizer = parts.get("optimizer")
    if optimizer is not None and not all(0 <= b < 1 for b in optimizer.betas):
        raise UserError(f"{where}: optimizer.betas = {list(optimizer.betas)}: each must be in [0, 1)")
