"""Plugin discovery: load every module of the ``rsslctl`` entry-point group into one pluggy manager."""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata as md
from types import ModuleType

import pluggy

from . import hookspecs
from .errors import UserError
from .options import closest

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
                self.register(module, package, version, name=ep.name)
            except Exception as exc:  # a broken plugin must not break the CLI
                msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
                self.broken.append(PluginInfo("?", ep.name, None, package, version, "", msg))

    def register(self, module: ModuleType, package: str = "?", version: str = "?", name: str | None = None) -> None:
        if self.pm.is_registered(module):
            return
        self.pm.register(module, name=name or module.__name__)
        self._provenance[id(module)] = (package, version)
        self.entries.cache_clear()

    @functools.lru_cache(maxsize=None)
    def entries(self, kind: str) -> dict[str, PluginInfo]:
        out: dict[str, PluginInfo] = {}
        hook = getattr(self.pm.hook, KINDS[kind])
        for impl in hook.get_hookimpls():
            package, version = self._provenance.get(id(impl.plugin), ("?", "?"))
            try:
                classes = impl.function() or []
            except Exception as exc:
                self.broken.append(PluginInfo(kind, impl.plugin_name, None, package, version, "", f"{type(exc).__name__}: {exc}"))
                continue
            for cls in classes:
                out[cls.name] = PluginInfo(kind, cls.name, cls, package, version, _first_line(cls))
        return out

    def commands(self) -> list:
        """Click commands from every plugin's ``rsslctl_commands`` hook (errors are kept in ``broken``)."""
        out = []
        for impl in self.pm.hook.rsslctl_commands.get_hookimpls():
            try:
                out += list(impl.function() or [])
            except Exception as exc:
                package, version = self._provenance.get(id(impl.plugin), ("?", "?"))
                self.broken.append(PluginInfo("command", impl.plugin_name, None, package, version, "",
                                              f"{type(exc).__name__}: {exc}"))
        return out

    def get(self, kind: str, name: str, where: str = "") -> type:
        entries = self.entries(kind)
        if name not in entries:
            names = sorted(entries)
            loc = f"{where}: " if where else ""
            raise UserError(f"{loc}unknown {kind} '{name}'{closest(name, names)}; installed: {', '.join(names) or 'none'}"
                            f" (see `rsslctl plugins`)")
        return entries[name].cls  # type: ignore[return-value]

    def all(self) -> list[PluginInfo]:
        rows = [info for kind in KINDS for info in self.entries(kind).values()]
        return rows + self.broken


@functools.lru_cache(maxsize=1)
def registry() -> Registry:
    """The process-wide registry of installed plugins."""
    return Registry()


def get(kind: str, name: str, where: str = "") -> type:
    return registry().get(kind, name, where)
