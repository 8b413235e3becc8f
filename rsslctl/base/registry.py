"""Plugin discovery: every module of the ``rsslctl`` entry-point group is registered in one pluggy manager.

Nothing a plugin does can take the CLI down: an import that raises (even ``SystemExit``), a misspelt hook, a hook
that raises or returns something other than a list of plugin classes, a class without a name or with malformed
Options — each is recorded with its error, shown by ``rsslctl plugins``, and the other plugins keep working.
A name provided by two packages is an error naming both; ``package:name`` picks one explicitly.
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
from rsslctl.base.options import closest

ENTRY_POINT_GROUP = "rsslctl"
KINDS = {
    "method": "rsslctl_methods",
    "attack": "rsslctl_attacks",
    "backbone": "rsslctl_backbones",
    "coreset": "rsslctl_coreset_selectors",
    "dataset": "rsslctl_datasets",
}


@dataclasses.dataclass
class PluginInfo:
    kind: str
    name: str
    cls: type | None
    package: str
    version: str
    doc: str
    error: str = ""


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
        if load_entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            package = dist.metadata["Name"] if dist else "?"
            version = dist.version if dist else "?"
            try:
                module = ep.load()
            except BaseException as exc:  # noqa: BLE001 — a broken plugin (even one calling sys.exit) is reported
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self.broken.append(PluginInfo("?", ep.name, None, package, version, "", _describe(exc)))
                continue
            self.register(module, package, version, name=ep.name)

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
        self.entries.cache_clear()
        self.command_entries.cache_clear()

    def unregister(self, module: ModuleType) -> None:
        """Remove a module registered with ``register`` (tests use it to leave the registry as they found it)."""
        if self.pm.is_registered(module):
            self.pm.unregister(module)
        self.entries.cache_clear()
        self.command_entries.cache_clear()

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

    @functools.lru_cache(maxsize=None)
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
            raise UserError(f"{loc}unknown {kind} '{name}'{closest(bare, names)}; installed: {', '.join(names) or 'none'}"
                            f" (see `rsslctl plugins`)")
        if len(found) > 1:
            both = " and ".join(f"'{i.package}'" for i in found)
            raise UserError(f"{loc}{kind} '{bare}' is provided by {both}; name one explicitly, e.g. "
                            f"'{found[-1].package}:{bare}', or uninstall one")
        return found[0]

    def get(self, kind: str, name: str, where: str = "") -> type:
        return self.info(kind, name, where).cls  # type: ignore[return-value]

    @functools.lru_cache(maxsize=None)
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
        """The click commands plugins contribute."""
        return [command for command, _ in self.command_entries()]

    def all(self) -> list[PluginInfo]:
        rows = [info for kind in KINDS for infos in self.entries(kind).values() for info in infos]
        for infos in (i for kind in KINDS for i in self.entries(kind).values() if len(i) > 1):
            for info in infos:
                others = [o.package for o in infos if o is not info]
                info.error = f"name also provided by {', '.join(others)}; choose with '{info.package}:{info.name}'"
        return rows + [info for _, info in self.command_entries()] + self.broken


@functools.lru_cache(maxsize=1)
def registry() -> Registry:
    """The process-wide registry of installed plugins."""
    return Registry()


def get(kind: str, name: str, where: str = "") -> type:
    """The plugin class registered as ``name`` for ``kind`` (e.g. "method"); UserError naming ``where`` and the
    closest names when there is none."""
    return registry().get(kind, name, where)
