"""Declarative options: plugins and recipe sections declare dataclasses; we validate dicts against them.

A field's metadata may hold ``min``/``max`` (inclusive bounds), ``choices`` and ``help``.
Fields typed ``Number`` accept a float or a fraction string such as ``"8/255"``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from fractions import Fraction
from typing import Any, Literal, get_args, get_origin

from rsslctl.base.errors import UserError
from rsslctl.base.limits import check_nested, check_number


class Number(float):
    """A float that may be written in a recipe as a fraction string, e.g. ``"8/255"``."""


#: ``opt(earlier=...)`` left out: the option behaves the same in runs saved before it existed
NOT_GIVEN: Any = object()


def opt(default: Any, help: str = "", *, min: float | None = None, max: float | None = None,
        choices: typing.Sequence[Any] | None = None, earlier: Any = NOT_GIVEN) -> Any:
    """Declare an option with a default, a one-line help text and optional bounds/choices.

    ``earlier`` is for an option added to change a behaviour: the value that gives the behaviour of runs saved before
    the option existed. A saved run whose recipe lacks the option keeps that value when it is resumed or evaluated,
    so a new default never changes a run half-way."""
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None}
    if earlier is not NOT_GIVEN:
        meta["earlier"] = earlier
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class NoOptions:
    """For plugins without options."""


class Plugin:
    """What every plugin class has: a registered ``name``, an ``Options`` dataclass and a docstring (first line =
    description). Kind-specific base classes (Method, Attack, Backbone, Dataset, CoresetSelector) derive from it."""

    name: typing.ClassVar[str] = ""
    Options: typing.ClassVar[type] = NoOptions
    #: BibTeX of the work this plugin implements or reads ('' = nothing to cite); `rsslctl cite` prints it
    citation: typing.ClassVar[str] = ""

    @classmethod
    def check_options(cls, options: Any, where: str) -> None:
        """Raise UserError for values that validate field by field but cannot work together or on this machine
        (e.g. an unknown model name); called during recipe validation, before any work is done."""


def closest(name: str, candidates: typing.Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest candidate, or ''."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def parse_number(value: Any, where: str, check: bool = True) -> float:
    """A float from a number or a fraction string; non-finite or absurd values are refused unless ``check`` is
    false (then the caller checks them against the option's own bounds)."""
    if isinstance(value, bool):
        raise UserError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if check:
            check_number(number, where)
        return number
    if isinstance(value, str) and len(value) <= 100:
        try:
            number = float(Fraction(value.replace(" ", "")))
        except OverflowError:
            number = math.inf if not value.strip().startswith("-") else -math.inf
        except (ValueError, ZeroDivisionError):
            number = None
        if number is not None:
            if check:
                check_number(number, where)
            return number
    raise UserError(f"{where}: expected a number such as 0.03 or '8/255', got {value!r}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}"
                            + (closest(value, map(str, choices)) if isinstance(value, str) else ""))
        return value
    if tp is Number:
        return parse_number(value, where, check=False)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"{where}: expected an integer, got {str(value)[:40]!r}")
        check_number(value, where)
        return value
    if tp is float:
        return parse_number(value, where, check=False)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{where}: expected a list of {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported option type {tp!r} at {where}")


def validate(cls: type, values: dict[str, Any], where: str, extra_keys: typing.Iterable[str] = ()) -> Any:
    """Build ``cls`` (a dataclass) from ``values``; raise UserError with one clear line on any problem.

    ``extra_keys`` are keys of the same table handled elsewhere (e.g. ``name``); they are allowed
    and used only for 'did you mean' suggestions.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    extra = set(extra_keys)
    kwargs = {}
    for key, value in values.items():
        if key in extra:
            continue
        if key not in fields:
            valid = sorted(set(fields) | extra)
            raise UserError(f"{where}: unknown key '{key}'{closest(key, valid)}; valid keys: {', '.join(valid)}")
        field = fields[key]
        loc = f"{where}.{key}"
        coerced = _coerce(value, hints[key], loc)
        meta = field.metadata
        if meta.get("choices") and coerced not in meta["choices"]:
            raise UserError(f"{loc}: {coerced!r} is not one of {', '.join(map(repr, meta['choices']))}"
                            + (closest(coerced, map(str, meta["choices"])) if isinstance(coerced, str) else ""))
        if isinstance(coerced, (int, float)) and not isinstance(coerced, bool):
            check_number(coerced, loc, meta.get("min"), meta.get("max"))
        else:
            check_nested(coerced, loc)
        kwargs[key] = coerced
    return cls(**kwargs)


def as_dict(obj: Any) -> dict[str, Any]:
    """Plain-JSON/TOML dict of an options dataclass (tuples become lists)."""
    def conv(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return {f.name: conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each option; used by `rsslctl plugins --options`."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        tp = hints[f.name]
        tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        out.append((f.name, tname, default, f.metadata.get("help", "")))
    return out
