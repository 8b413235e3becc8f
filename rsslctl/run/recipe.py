"""TOML recipes: parse, apply ``--set`` overrides, validate every section and plugin option up front.

A recipe is a set of tables. Plugin tables (``data``, ``backbone``, ``method``, ``attack``, ``coreset``) hold
``name`` (the plugin) next to the core keys and the plugin's own options, all in one flat table. Names a recipe
leaves out come from the shipped ``defaults.toml``. The resolved recipe (every default filled in) is what runs and
what is written to the run directory.

Validation comes in two passes: every key, type and range first, from the plugins' (declared) Options alone, so a
typo is refused without importing torch or any plugin module; then the plugin classes are loaded and their own
``check_options`` run (e.g. a timm model name).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
from pathlib import Path
from typing import Any, Collection, Literal

from rsslctl.base import registry
from rsslctl.base.console import err_console
from rsslctl.base.errors import UserError
from rsslctl.base.limits import MAX_BATCH, MAX_EPOCHS, MAX_IMAGE_SIZE, MAX_SEED, MAX_STEPS, check_recipe
from rsslctl.base.options import Number, as_dict, closest, opt, validate
from rsslctl.data.options import AugmentOptions
from rsslctl.method.options import CoresetOptions
from rsslctl.method.options import check_options as check_coreset
from rsslctl.nn.options import EncoderOptions, OptimizerOptions, ScheduleOptions
from rsslctl.run.logs import LoggingOptions

MAX_RECIPE_BYTES = 1 << 20
NONE = "none"  # the plugin name that switches an optional plugin table off


@dataclasses.dataclass
class RunOptions:
    name: str = opt("run", "run name; the run directory is <output_dir>/<name>")
    seed: int = opt(0, "global random seed", min=0, max=MAX_SEED)
    output_dir: str = opt("runs", "where run directories are created")


@dataclasses.dataclass
class DataOptions:
    root: str = opt("data", "data root the dataset plugin reads from")
    download: bool = opt(False, "download missing files (only datasets that support it)")
    train_split: str = opt("train", "split used for pretraining and fine-tuning")
    test_split: str = opt("test", "split used for evaluation")
    image_size: int = opt(32, "images are presented at this square size", min=8, max=MAX_IMAGE_SIZE)
    limit: int = opt(0, "use only the first N training images (0 = all)", min=0)
    stream: Literal["auto", "on", "off"] = opt(
        "auto", "training split resident on the device (off) or decoded from disk by DataLoader workers (on); auto "
                "streams only when its uint8 images exceed resident_fraction of the device's memory")
    workers: int = opt(4, "DataLoader worker processes of the streamed path (0 = decode in the training process)",
                       min=0, max=256)
    resident_fraction: float = opt(0.5, "stream = auto: largest share of the device's memory the resident split may "
                                        "take", min=0.01, max=1.0)
    decode_on_device: bool = opt(False, "streamed path on CUDA: decode JPEG files in batches on the GPU (nvJPEG) "
                                        "instead of in the workers; pixels may differ slightly from the CPU decoder")


@dataclasses.dataclass
class EngineOptions:
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = opt("auto",
                                                     "auto = bf16 autocast on CUDA and on CPUs with native bf16 "
                                                     "(AVX512-BF16/AMX), else fp32")
    channels_last: bool = opt(True, "channels_last memory format for model and inputs")
    compile: bool = opt(False, "torch.compile the method's training step (attack and loss; augmentation stays eager)")
    cuda_graphs: bool = opt(False, "with compile on CUDA: replay the compiled graphs as CUDA graphs (torch.compile "
                                   "mode reduce-overhead); training batches have static shapes")
    grad_clip: float = opt(0.0, "clip the global gradient norm (0 = off)", min=0)
    checkpoint_every: int = opt(1, "write a checkpoint every N epochs (and always at the end)", min=1, max=MAX_EPOCHS)
    checkpoint_every_steps: int = opt(0, "also write a checkpoint every N minibatches inside an epoch, for long "
                                         "(streamed) epochs; resume continues at that position (0 = off)", min=0)
    keep_checkpoints: int = opt(2, "how many checkpoints to keep", min=1, max=1000)
    log_every: int = opt(10, "read metrics back from the device every N steps", min=1)
    threads: int = opt(0, "CPU threads for torch (0 = torch default); fix it for bit-reproducible CPU runs", min=0,
                       max=4096)
    deterministic: bool = opt(False, "deterministic algorithms only (torch.use_deterministic_algorithms); "
                                     "bit-reproducible runs on one machine, usually slower on CUDA")
    backend: Literal["auto", "nccl", "gloo"] = opt("auto", "torch.distributed backend under torchrun (auto = nccl on "
                                                           "CUDA, gloo on CPU)", choices=("auto", "nccl", "gloo"))
    sync_bn: bool = opt(False, "under torchrun: batch-norm statistics of the global batch (SyncBatchNorm, both routes "
                               "of a dual-BN encoder); false = per-device statistics, as the references' DataParallel")
    join_timeout_s: int = opt(300, "several processes: how long a rank waits for the others to start and join before "
                                   "it stops with one line", min=1, max=86400)
    collective_timeout_s: int = opt(3600, "several processes: how long a rank waits in a collective (rank 0 may run "
                                          "monitors or write checkpoints meanwhile) before it stops", min=1,
                                    max=7 * 86400)


@dataclasses.dataclass
class EvaluationOptions:
    epochs: int = opt(30, "linear-probe epochs on frozen features", min=1, max=MAX_EPOCHS)
    lr: float = opt(0.1, "linear-probe SGD learning rate (cosine decay)", min=0)
    batch_size: int = opt(256, "linear-probe batch size", min=1, max=MAX_BATCH)
    weight_decay: float = opt(2e-4, "linear-probe weight decay", min=0)
    route: Literal["auto", "normal", "pgd"] = opt("auto",
                                                  "BN route of a dual-BN encoder (auto = pgd, as in the protocol)")
    attack: str = opt("", "attack plugin for robust accuracy (also the PGD row of the suite and ALF's training "
                          "attack); default from defaults.toml")
    single_step_attack: str = opt("", "attack plugin of the suite's single-step (FGSM) row; default from defaults.toml")
    eps: Number = opt(8 / 255, "attack radius", min=0)
    step_size: Number = opt(2 / 255, "attack step size", min=0)
    steps: int = opt(20, "attack iterations", min=1, max=MAX_STEPS)
    clamp_start: bool = opt(True, "clip the attack's random start into [0, 1] (false = reference PGD)")
    limit: int = opt(0, "evaluate on the first N test images (0 = all)", min=0)
    knn_k: int = opt(20, "neighbours of the weighted kNN accuracy", min=1)
    knn_temperature: float = opt(0.07, "temperature τ of the kNN vote weights exp(s/τ)", min=1e-4)


@dataclasses.dataclass(frozen=True)
class Slot:
    """One plugin table of a recipe: the plugin's name, its class (None when switched off) and its options."""

    name: str
    cls: type | None
    options: Any

    def build(self, *args: Any) -> Any:
        """An instance of the plugin: ``cls(options, *args)``."""
        if self.cls is None:
            raise ValueError(f"plugin '{self.name}' is switched off")
        return self.cls(self.options, *args)


OFF = Slot(NONE, None, None)
CORE = {"run": RunOptions, "data": DataOptions, "augment": AugmentOptions, "backbone": None, "encoder": EncoderOptions,
        "method": None, "attack": None, "optimizer": OptimizerOptions, "schedule": ScheduleOptions,
        "coreset": CoresetOptions, "engine": EngineOptions, "evaluation": EvaluationOptions, "logging": LoggingOptions}
#: recipe table → (plugin kind, attribute of the Recipe holding its slot)
PLUGIN_TABLES = {"data": ("dataset", "dataset"), "backbone": ("backbone", "backbone"), "method": ("method", "method"),
                 "attack": ("attack", "attack"), "coreset": ("coreset", "selector")}
OPTIONAL = ("attack", "coreset")  # plugin tables whose name may be "none"


@dataclasses.dataclass
class Recipe:
    """A validated recipe: the core options of each table, one ``Slot`` per plugin table, and ``resolved``
    (the plain dict written to the run directory). Tables left out with ``only`` are None."""

    resolved: dict[str, dict[str, Any]]
    run: RunOptions
    data: DataOptions
    augment: AugmentOptions | None
    encoder: EncoderOptions | None
    optimizer: OptimizerOptions | None
    schedule: ScheduleOptions | None
    coreset: CoresetOptions | None
    engine: EngineOptions
    evaluation: EvaluationOptions
    logging: LoggingOptions
    dataset: Slot
    backbone: Slot | None
    method: Slot | None
    attack: Slot | None
    selector: Slot | None
    source: str = ""


@functools.lru_cache(maxsize=1)
def shipped_defaults() -> dict[str, Any]:
    """The packaged defaults.toml: ``recipe`` (tables merged under every recipe) and ``commands``."""
    return tomllib.loads((Path(__file__).with_name("defaults.toml")).read_text())


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
    except (tomllib.TOMLDecodeError, RecursionError):
        value = raw.strip()
    return path, value


def shipped_recipes() -> dict[str, Any]:
    """Name → file (an importlib.resources Traversable) of every recipe installed with rsslctl."""
    from importlib.resources import files
    try:
        folder = files("rsslctl_recipes")
    except ModuleNotFoundError:
        return {}
    return {f.name[:-5]: f for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".toml")}


def load_raw(path: str | Path) -> dict[str, Any]:
    """A recipe file, or a shipped recipe by name (``quickstart`` = the installed ``quickstart.toml``)."""
    shipped = shipped_recipes()
    name = str(path).removesuffix(".toml")
    try:
        if Path(path).is_file():
            data = Path(path).read_bytes()
        elif name in shipped:
            data = shipped[name].read_bytes()
        else:
            raise UserError(f"{path}: recipe file not found, and no shipped recipe has that name; list them with "
                            "`rsslctl recipe list`")
        if len(data) > MAX_RECIPE_BYTES:
            raise UserError(f"{path}: {len(data):,} bytes is too large for a recipe (at most {MAX_RECIPE_BYTES:,})")
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start}); "
                        "save the recipe as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise UserError(f"{path}: invalid TOML: nested too deeply") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None


def _with_overrides(raw: dict[str, Any], overrides: list[str], where: str) -> dict[str, dict[str, Any]]:
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
    return raw


def _plugin_name(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: expected a plugin name (string), got {value!r}")
    return value


def _plugin_table(table: str, values: dict[str, Any], name: str, where: str,
                  saved: bool = False) -> tuple[Any, Slot, dict[str, Any]]:
    """(core options, plugin slot, resolved table) of one plugin table, checked against the plugin's Options only:
    the slot's ``cls`` is None until ``_load_plugins``. ``saved``: the table comes from a run directory, so options
    it predates keep their ``earlier`` value."""
    core_cls = CORE[table]
    kind = PLUGIN_TABLES[table][0]
    core_keys = {f.name for f in dataclasses.fields(core_cls)} if core_cls else set()
    if name == NONE:  # switched off; its core keys still apply (e.g. coreset.indices_file), other keys are ignored
        core = validate(core_cls, {k: v for k, v in values.items() if k in core_keys}, where) if core_cls else None
        return core, OFF, {"name": NONE, **(as_dict(core) if core else {})}
    info = registry.registry().info(kind, name, f"{where}.name")  # declared plugins: no import of their module
    plugin_keys = {f.name for f in dataclasses.fields(info.options)}
    everything = core_keys | plugin_keys | {"name"}
    for key in values:
        if key not in everything:
            valid = sorted(everything)
            raise UserError(f"{where}: unknown key '{key}'{closest(key, valid)}; valid keys: {', '.join(valid)}")
    if saved:
        values = {**earlier_values(info.options, values, where), **values}
        if core_cls:
            values = {**earlier_values(core_cls, values, where), **values}
    core = validate(core_cls, {k: v for k, v in values.items() if k in core_keys}, where) if core_cls else None
    options = validate(info.options, {k: v for k, v in values.items() if k in plugin_keys}, where)
    return core, Slot(name, None, options), _resolved_table(name, core, options)


def _resolved_table(name: str, core: Any, options: Any) -> dict[str, Any]:
    return {"name": name, **(as_dict(core) if core else {}), **as_dict(options)}


def _load_plugins(parts: dict[str, Any], resolved: dict[str, dict[str, Any]], where: str) -> None:
    """The second pass: load each plugin's class into its slot and run the plugin's own checks (which may fill in
    options, so the resolved table is written again)."""
    for table, (kind, slot) in PLUGIN_TABLES.items():
        part = parts.get(slot)
        if part is None or part is OFF:
            continue
        cls = registry.get(kind, part.name, f"{where}: {table}.name")
        cls.check_options(part.options, f"{where}: {table}")
        parts[slot] = Slot(part.name, cls, part.options)
        core = parts.get(table) if CORE[table] is not None else None  # backbone, method, attack: no core keys
        resolved[table] = _resolved_table(part.name, core, part.options)


def earlier_values(options_cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``earlier`` value of every option a saved table lacks (it predates them), with a note on stderr."""
    kept = {f.name: f.metadata["earlier"] for f in dataclasses.fields(options_cls)
            if "earlier" in f.metadata and f.name not in values}
    for key, value in kept.items():
        shown = str(value).lower() if isinstance(value, bool) else repr(value)
        err_console.print(f"note: {where}: saved before '{key}' existed; keeping the behaviour it was made with "
                          f"({key} = {shown})", markup=False, highlight=False)
    return kept


def resolve(raw: dict[str, Any], overrides: list[str] = (), source: str = "",
            only: Collection[str] | None = None, load_plugins: bool = True, saved: bool = False) -> Recipe:
    """Validate ``raw`` (+ overrides) completely; raise UserError with one line on the first problem.

    ``saved``: ``raw`` is the recipe of a run directory; options added since it was written keep the behaviour the
    run was made with (their ``earlier`` value) rather than the current default.

    ``only`` limits validation to those tables (plus run, data, engine and evaluation, which every command uses):
    evaluating a fine-tuned classifier, for instance, needs no pretraining method installed. ``load_plugins=False``
    stops after the first pass (keys, types, ranges): the slots' ``cls`` stay None and no plugin module is imported.
    """
    where = source or "recipe"
    raw = _with_overrides(raw, list(overrides), where)
    wanted = set(CORE) if only is None else set(only) | {"run", "data", "engine", "evaluation", "logging"}
    defaults = shipped_defaults()["recipe"]
    names = {t: raw.get(t, {}).get("name", defaults.get(t, {}).get("name", NONE)) for t in PLUGIN_TABLES}
    needs_attack = False
    if "method" in wanted:
        method_info = registry.registry().info("method", _plugin_name(names["method"], "method.name"),
                                               f"{where}: method.name")
        needs_attack = method_info.needs_attack
        if "name" not in raw.get("attack", {}) and not needs_attack:
            names["attack"] = NONE
        elif names["attack"] == NONE and needs_attack:
            raise UserError(f"{where}: attack: method '{names['method']}' trains adversarially and needs an attack; "
                            f"set [attack] name = \"{defaults['attack']['name']}\"")
    parts: dict[str, Any] = {"source": source}
    resolved: dict[str, dict[str, Any]] = {}
    for table, core_cls in CORE.items():
        values = {**{k: v for k, v in defaults.get(table, {}).items() if k != "name"}, **raw.get(table, {})}
        if table not in wanted:
            parts[table] = None
            if table in PLUGIN_TABLES:
                parts[PLUGIN_TABLES[table][1]] = None
            continue
        if table in PLUGIN_TABLES:
            kind, slot = PLUGIN_TABLES[table]
            name = _plugin_name(names[table], f"{table}.name")
            if name == NONE and table not in OPTIONAL:
                raise UserError(f"{where}: {table}.name cannot be \"none\"; name a {kind} plugin")
            core, parts[slot], resolved[table] = _plugin_table(table, values, name, f"{where}: {table}", saved)
            if core_cls is not None:
                parts[table] = core
        else:
            parts[table] = validate(core_cls, values, f"{where}: {table}")
            resolved[table] = as_dict(parts[table])
    sched = parts.get("schedule")
    if sched is not None and sched.kind == "exponential" and sched.min_lr <= 0:
        raise UserError(f"{where}: schedule.min_lr = 0 with kind = \"exponential\"; the LR decays geometrically "
                        "towards min_lr, so set it > 0 (e.g. lr / 100)")
    ev = parts["evaluation"]
    _check_attack_options(ev.attack, f"{where}: evaluation.attack", eps=ev.eps, step_size=ev.step_size,
                          steps=ev.steps, clamp_start=ev.clamp_start)
    check_recipe(parts, where)
    if parts["coreset"] is not None:
        check_coreset(parts["coreset"], parts["selector"].name, parts["schedule"].epochs, f"{where}: coreset")
    if load_plugins:
        _load_plugins(parts, resolved, where)
        method = parts.get("method")
        needs = method.cls.attack_needed(method.options) if method is not None else ""
        if needs and parts.get("attack") is OFF:
            raise UserError(f"{where}: attack: {needs} trains adversarially and needs an attack; "
                            f"set [attack] name = \"{defaults['attack']['name']}\"")
    return Recipe(resolved=resolved, **{k: v for k, v in parts.items() if k in RECIPE_FIELDS})


RECIPE_FIELDS = {f.name for f in dataclasses.fields(Recipe)} - {"resolved"}


def _check_attack_options(name: str, where: str, **values: Any) -> None:
    """The attack ``name`` is installed and takes these values (those it has no option for are dropped, as
    ``make_attack(known_only=True)`` does), read from its Options without importing it."""
    options = registry.registry().info("attack", name, where).options
    keys = {f.name for f in dataclasses.fields(options)}
    validate(options, {k: v for k, v in values.items() if k in keys}, where)


def load(path: str | Path, overrides: list[str] = (), only: Collection[str] | None = None,
         load_plugins: bool = True, saved: bool = False) -> Recipe:
    """Read, resolve and validate a recipe file (``saved``: the ``recipe.toml`` of a run directory)."""
    return resolve(load_raw(path), list(overrides), str(path), only, load_plugins, saved)


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
