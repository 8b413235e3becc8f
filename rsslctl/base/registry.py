"""Plugin discovery: every module of the ``rsslctl`` entry-point group is registered in one pluggy manager.

Nothing a plugin does can take the CLI down: an import that raises (even ``SystemExit``), a misspelt hook, a hook
that raises or returns something other than a list of plugin classes, a class without a name or with malformed
Options — each is recorded with its error, shown by ``rsslctl plugins``, and the other plugins keep working.
A name provided by two packages is an error naming both; ``package:name`` picks one explicitly.

A plugin may also declare itself lazily (``Declared``, returned by the ``rsslctl_declarations`` hook of a torch-free
module in the ``rsslctl.declarations`` entry-point group): its name, description, citation and Options are then known
without importing the module that implements it, which is loaded the first time its class is needed. Listing,
citing and validating a recipe therefore import no torch.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata as md
from types import ModuleType
from typing import Any

import pluggy

from rsslctl.base import hookspecs
from rsslctl.base.errors import UserError
from rsslctl.base.options import NoOptions, closest

ENTRY_POINT_GROUP = "rsslctl"
#: torch-free modules whose ``rsslctl_declarations`` hook declares plugins of the same distribution
DECLARATION_GROUP = "rsslctl.declarations"
KINDS = {
    "method": "rsslctl_methods",
    "attack": "rsslctl_attacks",
    "backbone": "rsslctl_backbones",
    "coreset": "rsslctl_coreset_selectors",
    "dataset": "rsslctl_datasets",
}


@dataclasses.dataclass(frozen=True)
class Declared:
    """A plugin as a torch-free module declares it: what listing, citing and recipe validation need, without
    importing ``entry_point`` (the name of the entry point, in the ``rsslctl`` group of the same distribution, whose
    module implements it). ``kind`` is a plugin kind (``method``, ``attack``, ...) or ``command`` (a CLI verb; then
    ``name`` is the verb and ``doc`` its short help). The implementing class must agree with the declaration (name,
    Options, citation, needs_attack, first docstring line); the conformance tests check every installed one."""

    kind: str
    name: str
    entry_point: str
    doc: str = ""
    options: type = NoOptions
    citation: str = ""
    needs_attack: bool = False


@dataclasses.dataclass
class PluginInfo:
    kind: str
    name: str
    _cls: type | None
    package: str
    version: str
    doc: str
    error: str = ""
    #: the lazy declaration of a plugin whose module was not imported when this entry was made
    declared: Declared | None = None
    _registry: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def cls(self) -> type | None:
        """The plugin's class (None when broken, and for verbs); a declared plugin's module is imported on first
        access, so code that only lists, cites or validates reads ``options``, ``citation`` and ``doc`` instead."""
        if self._cls is None and self.declared is not None and self.kind != "command" and self._registry is not None:
            self._cls = self._registry.load_declared(self)._cls
        return self._cls

    @property
    def options(self) -> type:
        """The plugin's Options dataclass (the declared one: no import)."""
        return self.declared.options if self.declared is not None else self.cls.Options  # type: ignore[union-attr]

    @property
    def citation(self) -> str:
        return self.declared.citation if self.declared is not None else getattr(self.cls, "citation", "")

    @property
    def needs_attack(self) -> bool:
        return self.declared.needs_attack if self.declared is not None else bool(getattr(self.cls, "needs_attack",
                                                                                              False))


def _first_line(cls: type) -> str:
    return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


def _describe(exc: BaseException) -> str:
    return (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0]


def class_problem(cls: Any) -> str:
    """Why ``cls`` cannot serve as a plugin class, or '' when it can."""
    if not isinstance(cls, type):
        return f"hook returned {cls!r}, not a class"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or ":" in name:
        return f"{cls.__name__} has no valid 'name' (a non-empty string without ':')"
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        return f"{cls.__name__}.Options is not a dataclass"
    required = [f.name for f in dataclasses.fields(options)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        return f"{cls.__name__}.Options field '{required[0]}' has no default"
    return ""


class Registry:
    """All installed plugins, by kind and name; broken plugins are kept with their error."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("rsslctl")
        self.pm.add_hookspecs(hookspecs)
        self.broken: list[PluginInfo] = []
        self._provenance: dict[int, tuple[str, str]] = {}
        #: (package, entry-point name) → entry point whose module is imported only when one of its classes is needed
        self._deferred: dict[tuple[str, str], Any] = {}
        if load_entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        for ep in md.entry_points(group=DECLARATION_GROUP):
            self._load(ep, f"{DECLARATION_GROUP}:{ep.name}")
        declared = {(package, d.entry_point) for d, _, package, _ in self.declarations()}
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            key = (_package(ep)[0], ep.name)
            if key in declared:
                self._deferred[key] = ep
            else:
                self._load(ep)
        for d, plugin, package, version in self.declarations():  # a declaration naming no entry point is a bug
            if (package, d.entry_point) not in self._deferred:
                self.broken.append(PluginInfo(d.kind, d.name, None, package, version, "", f"declared by '{plugin}' "
                                              f"as entry point '{d.entry_point}', which package '{package}' lacks"))

    def _load(self, ep: Any, name: str = "") -> bool:
        """Import an entry point's module and register it; False (and the error recorded) when that fails."""
        package, version = _package(ep)
        name = name or ep.name
        try:
            module = ep.load()
        except BaseException as exc:  # noqa: BLE001 — a broken plugin (even one calling sys.exit) is reported
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.broken.append(PluginInfo("?", name, None, package, version, "", _describe(exc)))
            return False
        self.register(module, package, version, name=name)
        return True

    def load_declared(self, info: PluginInfo) -> PluginInfo:
        """The loaded twin of a declared plugin: imports the module that implements it (once). UserError when that
        module fails to load or does not provide what it declared."""
        if info.declared is None:
            return info
        ep = self._deferred.pop((info.package, info.declared.entry_point), None)
        if ep is not None:
            self._load(ep)
            self._clear()  # the declared entries of that module give way to its classes (or to its error)
        if info.kind == "command":
            found = [i for _, i in self.command_entries() if i.name == info.name and i.package == info.package]
        else:
            found = [i for i in self.entries(info.kind).get(info.name, []) if i.package == info.package and i._cls]
        if not found:
            error = next((b.error for b in self.broken if b.name == info.declared.entry_point), "")
            raise UserError(f"{info.kind} '{info.name}' of package '{info.package}' failed to load: "
                            f"{error or f'its module ({info.declared.entry_point!r}) does not provide it'}")
        return found[0]

    def register(self, module: ModuleType, package: str = "?", version: str = "?", name: str | None = None) -> None:
        """Add a plugin module; a hook implementation that matches no hook specification is reported, not ignored."""
        if self.pm.is_registered(module):
            return
        name = name or module.__name__
        try:
            self.pm.register(module, name=name)
        except Exception as exc:  # pluggy rejects malformed implementations (wrong arguments)
            self.broken.append(PluginInfo("?", name, None, package, version, "", _describe(exc)))
            return
        unknown = [hook for hook in dir(self.pm.hook) if hook.startswith("rsslctl")
                   and not getattr(self.pm.hook, hook).has_spec()
                   and any(impl.plugin is module for impl in getattr(self.pm.hook, hook).get_hookimpls())]
        if unknown:
            self.pm.unregister(module)
            known = [h for h in dir(hookspecs) if h.startswith("rsslctl_")]
            self.broken.append(PluginInfo("?", name, None, package, version, "",
                                          f"unknown hook '{unknown[0]}'{closest(unknown[0], known)}"))
            return
        self._provenance[id(module)] = (package, version)
        self._clear()

    def unregister(self, module: ModuleType) -> None:
        """Remove a module registered with ``register`` (tests use it to leave the registry as they found it)."""
        if self.pm.is_registered(module):
            self.pm.unregister(module)
        self._clear()

    def _clear(self) -> None:
        self.entries.cache_clear()
        self.command_entries.cache_clear()
        self.declarations.cache_clear()
        self._pending.cache_clear()

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one process-wide registry; _clear() resets it
    def declarations(self) -> list[tuple[Declared, str, str, str]]:
        """(declaration, plugin, package, version) of every ``rsslctl_declarations`` hook (bad ones go to broken)."""
        out = []
        for obj, plugin, package, version in self._call("rsslctl_declarations", "declared"):
            if isinstance(obj, Declared) and obj.kind in (*KINDS, "command") and obj.name and ":" not in obj.name:
                out.append((obj, plugin, package, version))
            else:
                self.broken.append(PluginInfo("declared", plugin, None, package, version, "",
                                              f"rsslctl_declarations returned {obj!r}, not a valid Declared"))
        return out

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one process-wide registry; _clear() resets it
    def _pending(self, kind: str) -> list[PluginInfo]:
        """Declared plugins of ``kind`` whose module is not imported yet."""
        return [PluginInfo(kind, d.name, None, package, version, d.doc, declared=d, _registry=self)
                for d, _, package, version in self.declarations()
                if d.kind == kind and (package, d.entry_point) in self._deferred]

    def _call(self, hook_name: str, kind: str) -> list[tuple[Any, str, str, str]]:
        """(object, plugin name, package, version) for every object returned by every implementation of a hook."""
        out = []
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            package, version = self._provenance.get(id(impl.plugin), ("?", "?"))
            try:
                returned = impl.function()
                if returned is None:
                    returned = []
                if not isinstance(returned, (list, tuple)):
                    raise TypeError(f"{hook_name} returned {type(returned).__name__}, expected a list")
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self.broken.append(PluginInfo(kind, impl.plugin_name, None, package, version, "", _describe(exc)))
                continue
            out += [(obj, impl.plugin_name, package, version) for obj in returned]
        return out

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one process-wide registry; _clear() resets it
    def entries(self, kind: str) -> dict[str, list[PluginInfo]]:
        """Name → every installed class of that name (more than one = a conflict that ``get`` reports)."""
        out: dict[str, list[PluginInfo]] = {}
        for cls, plugin, package, version in self._call(KINDS[kind], kind):
            problem = class_problem(cls)
            if problem:
                self.broken.append(PluginInfo(kind, getattr(cls, "name", None) or plugin, None, package, version, "",
                                              problem))
                continue
            out.setdefault(cls.name, []).append(PluginInfo(kind, cls.name, cls, package, version, _first_line(cls)))
        for info in self._pending(kind):
            out.setdefault(info.name, []).append(info)
        return out

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries(kind))

    def info(self, kind: str, name: str, where: str = "") -> PluginInfo:
        """The one installed plugin ``name`` (or ``package:name``) of ``kind``; UserError when absent or ambiguous."""
        loc = f"{where}: " if where else ""
        package, _, bare = name.rpartition(":")
        found = self.entries(kind).get(bare, [])
        if package:
            found = [i for i in found if i.package == package]
        if not found:
            names = self.names(kind)
            raise UserError(f"{loc}unknown {kind} '{name}'{closest(bare, names)}; installed: "
                            f"{', '.join(names) or 'none'}"
                            f" (see `rsslctl plugins`)")
        if len(found) > 1:
            both = " and ".join(f"'{i.package}'" for i in found)
            raise UserError(f"{loc}{kind} '{bare}' is provided by {both}; name one explicitly, e.g. "
                            f"'{found[-1].package}:{bare}', or uninstall one")
        return found[0]

    def get(self, kind: str, name: str, where: str = "") -> type:
        """The class of plugin ``name`` (importing its module if it was only declared so far)."""
        return self.load_declared(self.info(kind, name, where)).cls  # type: ignore[return-value]

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one process-wide registry; _clear() resets it
    def command_entries(self) -> list[tuple[Any, PluginInfo]]:
        """(click command, its PluginInfo) from every plugin's ``rsslctl_commands`` hook (errors go to ``broken``)."""
        import click
        out = []
        for command, plugin, package, version in self._call("rsslctl_commands", "command"):
            if isinstance(command, click.Command) and command.name:
                doc = (command.help or "").strip().splitlines()[0] if command.help else ""
                out.append((command, PluginInfo("command", command.name, None, package, version, doc)))
            else:
                self.broken.append(PluginInfo("command", plugin, None, package, version, "",
                                              f"rsslctl_commands returned {command!r}, not a click command"))
        return out

    def commands(self) -> list[Any]:
        """The click commands plugins contribute (imports the modules of declared ones; failures go to broken)."""
        for info in self._pending("command"):
            try:
                self.load_declared(info)
            except UserError:
                pass
        return [command for command, _ in self.command_entries()]

    def command(self, info: PluginInfo) -> Any:
        """The click command of a (declared or loaded) command plugin; UserError when its module fails to load."""
        loaded = self.load_declared(info)
        return next(c for c, i in self.command_entries() if (i.name, i.package) == (loaded.name, loaded.package))

    def command_infos(self) -> list[PluginInfo]:
        """Every plugin verb: loaded ones and declared ones (not imported), for listing them."""
        return [info for _, info in self.command_entries()] + self._pending("command")

    def all(self) -> list[PluginInfo]:
        rows = [info for kind in KINDS for infos in self.entries(kind).values() for info in infos]
        for infos in (i for kind in KINDS for i in self.entries(kind).values() if len(i) > 1):
            for info in infos:
                others = [o.package for o in infos if o is not info]
                info.error = f"name also provided by {', '.join(others)}; choose with '{info.package}:{info.name}'"
        return rows + self.command_infos() + self.broken


def _package(ep: Any) -> tuple[str, str]:
    """(distribution name, version) an entry point comes from."""
    dist = ep.dist
    if not dist:
        return "?", "?"
    try:
        return _distribution(dist)
    except TypeError:  # an unhashable stand-in for a distribution: read it uncached
        return dist.metadata["Name"], dist.version


@functools.lru_cache(maxsize=None)
def _distribution(dist: Any) -> tuple[str, str]:
    return dist.metadata["Name"], dist.version  # parses the METADATA file: once per distribution, not per plugin


@functools.lru_cache(maxsize=1)
def registry() -> Registry:
    """The process-wide registry of installed plugins."""
    return Registry()


def get(kind: str, name: str, where: str = "") -> type:
    """The plugin class registered as ``name`` for ``kind`` (e.g. "method"); UserError naming ``where`` and the
    closest names when there is none."""
    return registry().get(kind, name, where)
