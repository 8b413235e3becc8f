"""TOML recipes: parse, apply ``--set`` overrides, validate every section and plugin option up front.

A recipe is a set of tables. Plugin tables (``data``, ``backbone``, ``method``, ``attack``, ``coreset``) hold
``name`` (the plugin) next to the core keys and the plugin's own options, all in one flat table.
The resolved recipe (every default filled in) is what runs and what is written to the run directory.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from . import registry
from .attack import make_attack
from .augment import AugmentOptions
from .coreset import CoresetOptions, check_options as check_coreset
from .encoder import EncoderOptions
from .errors import UserError
from .options import Number, as_dict, closest, opt, validate
from .optim import OptimizerOptions, ScheduleOptions


@dataclasses.dataclass
class RunOptions:
    name: str = opt("run", "run name; the run directory is <output_dir>/<name>")
    seed: int = opt(0, "global random seed", min=0)
    output_dir: str = opt("runs", "where run directories are created")


@dataclasses.dataclass
class DataOptions:
    root: str = opt("data", "data root the dataset plugin reads from")
    download: bool = opt(False, "download missing files (only datasets that support it)")
    train_split: str = opt("train", "split used for pretraining and fine-tuning")
    test_split: str = opt("test", "split used for evaluation")
    image_size: int = opt(32, "images are presented at this square size", min=8)
    limit: int = opt(0, "use only the first N training images (0 = all)", min=0)


@dataclasses.dataclass
class EngineOptions:
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = opt("auto", "auto = bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    channels_last: bool = opt(True, "channels_last memory format for model and inputs")
    compile: bool = opt(False, "torch.compile the encoder")
    grad_clip: float = opt(0.0, "clip the global gradient norm (0 = off)", min=0)
    checkpoint_every: int = opt(1, "write a checkpoint every N epochs (and always at the end)", min=1)
    keep_checkpoints: int = opt(2, "how many checkpoints to keep", min=1)
    log_every: int = opt(10, "read metrics back from the device every N steps", min=1)
    threads: int = opt(0, "CPU threads for torch (0 = torch default)", min=0)


@dataclasses.dataclass
class EvaluationOptions:
    epochs: int = opt(30, "linear-probe epochs on frozen features", min=1)
    lr: float = opt(0.1, "linear-probe SGD learning rate (cosine decay)", min=0)
    batch_size: int = opt(256, "linear-probe batch size", min=1)
    weight_decay: float = opt(2e-4, "linear-probe weight decay", min=0)
    route: Literal["auto", "normal", "pgd"] = opt("auto", "BN route of a dual-BN encoder (auto = pgd, as in the protocol)")
    attack: str = opt("pgd", "attack plugin for robust accuracy")
    eps: Number = opt(8 / 255, "attack radius", min=0)
    step_size: Number = opt(2 / 255, "attack step size", min=0)
    steps: int = opt(20, "attack iterations", min=1)
    limit: int = opt(0, "evaluate on the first N test images (0 = all)", min=0)


CORE = {"run": RunOptions, "data": DataOptions, "augment": AugmentOptions, "backbone": None, "encoder": EncoderOptions,
        "method": None, "attack": None, "optimizer": OptimizerOptions, "schedule": ScheduleOptions,
        "coreset": CoresetOptions, "engine": EngineOptions, "evaluation": EvaluationOptions}
PLUGIN_TABLES = {"data": "dataset", "backbone": "backbone", "method": "method", "attack": "attack", "coreset": "coreset"}
DEFAULT_NAMES = {"data": "digits", "backbone": "timm", "method": "simclr", "coreset": "none"}


@dataclasses.dataclass
class Recipe:
    """A validated recipe: ``resolved`` (plain dict) plus parsed option objects per table."""

    resolved: dict[str, dict[str, Any]]
    core: dict[str, Any]
    plugin: dict[str, Any]
    plugin_cls: dict[str, type | None]
    source: str = ""

    def __getattr__(self, item: str) -> Any:
        core = self.__dict__.get("core", {})
        if item in core:
            return core[item]
        raise AttributeError(item)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (['a', 'b'], value); the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key.sub=value, e.g. --set schedule.epochs=5")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) != 2:
        raise UserError(f"--set {text!r}: the key must be table.key, e.g. method.temperature")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def load_raw(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found; list the shipped ones with `ls recipes/`")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None


def resolve(raw: dict[str, Any], overrides: list[str] = (), source: str = "") -> Recipe:
    """Validate ``raw`` (+ overrides) completely; raise UserError with one line on the first problem."""
    where = source or "recipe"
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        (table, key), value = parse_override(text)
        raw.setdefault(table, {})
        if not isinstance(raw[table], dict):
            raise UserError(f"--set {text!r}: '{table}' is not a table")
        raw[table][key] = value
    for table, value in raw.items():
        if table not in CORE:
            raise UserError(f"{where}: unknown table [{table}]{closest(table, CORE)}; valid tables: {', '.join(CORE)}")
        if not isinstance(value, dict):
            raise UserError(f"{where}: '{table}' must be a table ([{table}]), got {value!r}")

    core: dict[str, Any] = {}
    plugin: dict[str, Any] = {}
    plugin_cls: dict[str, type | None] = {}
    resolved: dict[str, dict[str, Any]] = {}
    method_name = raw.get("method", {}).get("name", DEFAULT_NAMES["method"])
    method_cls = registry.get("method", _name(method_name, "method.name"), f"{where}: method.name")
    for table, core_cls in CORE.items():
        values = raw.get(table, {})
        loc = f"{where}: {table}"
        if table in PLUGIN_TABLES:
            default = DEFAULT_NAMES.get(table) or ("pgd" if method_cls.needs_attack else "none")
            name = _name(values.get("name", default), f"{table}.name")
            if table == "attack" and name == "none":
                if method_cls.needs_attack:
                    raise UserError(f"{loc}: method '{method_name}' trains adversarially and needs an attack; "
                                    "set [attack] name = \"pgd\"")
                # other [attack] keys are ignored: `--set attack.name=none` switches a recipe's adversary off
                plugin_cls[table], plugin[table], core[table] = None, None, None
                resolved[table] = {"name": "none"}
                continue
            if table == "coreset" and name == "none":  # no selector; the core keys still apply (indices_file)
                plugin_cls[table], plugin[table] = None, None
                core[table] = validate(core_cls, values, loc, extra_keys=("name",))
                resolved[table] = {"name": "none", **as_dict(core[table])}
                continue
            cls = registry.get(PLUGIN_TABLES[table], name, f"{loc}.name")
            plugin_cls[table] = cls
            core_keys = {f.name for f in dataclasses.fields(core_cls)} if core_cls else set()
            plugin_keys = {f.name for f in dataclasses.fields(cls.Options)}
            everything = core_keys | plugin_keys | {"name"}
            for key in values:
                if key not in everything:
                    valid = sorted(everything)
                    raise UserError(f"{loc}: unknown key '{key}'{closest(key, valid)}; valid keys: {', '.join(valid)}")
            core[table] = validate(core_cls, {k: v for k, v in values.items() if k in core_keys}, loc) if core_cls else None
            plugin[table] = validate(cls.Options, {k: v for k, v in values.items() if k in plugin_keys}, loc)
            resolved[table] = {"name": name, **(as_dict(core[table]) if core_cls else {}), **as_dict(plugin[table])}
        else:
            core[table] = validate(core_cls, values, loc)
            resolved[table] = as_dict(core[table])
    _check_evaluation(core["evaluation"], where)
    check_coreset(core["coreset"], resolved["coreset"]["name"], core["schedule"].epochs, f"{where}: coreset")
    return Recipe(resolved, core, plugin, plugin_cls, source)


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: expected a plugin name (string), got {value!r}")
    return value


def _check_evaluation(ev: EvaluationOptions, where: str) -> None:
    make_attack(ev.attack, f"{where}: evaluation", known_only=True, eps=ev.eps, step_size=ev.step_size, steps=ev.steps)


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    return resolve(load_raw(path), list(overrides), str(path))


def dumps_toml(resolved: dict[str, dict[str, Any]]) -> str:
    """Write a resolved recipe as TOML (flat tables of scalars, arrays and inline tables)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        if v is None:
            return '""'
        raise TypeError(v)
    lines = []
    for table, values in resolved.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
