"""The extension point of the robustness suite: each measurement (clean, FGSM, PGD-k, AutoAttack, corruptions, the
ε-curve, …) is one ``Metric`` in ``METRICS``; the suite runs them in order, the report table takes its columns,
the leaderboard its fields and the command line its flags from them. A suite setting is declared once, with
``setting`` (its default, help and flag); the CLI flags and the stored settings are derived from the declarations.

Adding a metric is one ``register_metric(Metric(...))``: what it measures (``measure``, None = not run), its own
settings (``settings``, flags of ``rsslctl evaluate --mode`` and ``finetune``; their values in ``SuiteOptions.extra``),
its report columns and leaderboard fields.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

#: ``kind`` of a setting: how its flag reads the command line
KINDS = ("int", "eps", "choice", "switch", "flag", "text", "names", "eps_list")


def setting(default: Any, help: str, kind: str, *, flag: str = "", decides: bool = True, lo: int = 0,
            hi: int | None = None, choices: Sequence[str] = (), show_default: bool = True) -> Any:
    """A field of ``SuiteOptions``: default, one-line help, how its flag reads (``kind``), the flag ('' = --name;
    "-" = none, set from the recipe), whether it decides the numbers (stored with each result), bounds/choices."""
    meta = {"help": help, "kind": kind, "flag": flag, "decides": decides, "lo": lo, "hi": hi,
            "choices": tuple(choices), "show_default": show_default}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Setting:
    """A setting a registered metric adds (its value is ``SuiteOptions.extra[name]``); fields as in ``setting``."""

    name: str
    default: Any
    help: str
    kind: str = "flag"
    flag: str = ""
    decides: bool = True
    lo: int = 0
    hi: int | None = None
    choices: tuple[str, ...] = ()
    show_default: bool = True


@dataclasses.dataclass(frozen=True)
class Metric:
    """One measurement of the suite.

    ``measure(context)`` returns what goes into the result under ``key`` (None = not run; ``context`` has model,
    images x, labels y, test, opts, device and ``result``, the entries measured so far). ``columns``: (title,
    accuracy of a mode's result or None) of the report table; ``fields``: leaderboard fields of a result that holds
    this metric; ``notes``: caption lines of a mode's result."""

    key: str
    measure: Callable[[Any], Any]
    settings: tuple[Setting, ...] = ()
    columns: tuple[tuple[str, Callable[[dict[str, Any]], float | None]], ...] = ()
    fields: Callable[[Any], dict[str, Any]] | None = None
    notes: Callable[[str, dict[str, Any]], list[str]] | None = None


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to the suite (after those already registered); a key already taken is refused."""
    if metric.key in METRICS:
        raise ValueError(f"metric {metric.key!r} is already registered")
    METRICS[metric.key] = metric
    return metric


def unregister_metric(key: str) -> None:
    METRICS.pop(key, None)


def declared(options_cls: type) -> list[Setting]:
    """Every setting of the suite: the fields of ``options_cls`` (SuiteOptions) that have a flag or decide the
    numbers, then those of the registered metrics."""
    out = [Setting(f.name, f.default, **f.metadata) for f in dataclasses.fields(options_cls) if f.metadata]
    return out + [s for m in METRICS.values() for s in m.settings]


def leaderboard(result: Mapping[str, Any]) -> dict[str, Any]:
    """The leaderboard fields of a result, from the metrics it holds, in metric order."""
    fields: dict[str, Any] = {}
    for m in METRICS.values():
        if m.fields is not None and result.get(m.key) is not None:
            fields.update(m.fields(result))
    return fields
