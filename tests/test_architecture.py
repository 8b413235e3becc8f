"""The shape of the code: no import cycle, layers that import only downward, a core that never names a built-in plugin,
and a registry that reports every kind of broken plugin instead of failing or ignoring it."""
from __future__ import annotations

import ast
import dataclasses
import importlib.metadata as md
import types
from pathlib import Path
from typing import Any

import pytest

from rsslctl import hookimpl
from rsslctl.base.errors import UserError
from rsslctl.base.registry import Declared, Registry, registry

CORE = Path(__file__).resolve().parents[1] / "rsslctl"
MODULES = sorted(CORE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Project modules ``path`` imports, at top level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.split(".")[0] == "rsslctl"}
    return out


def test_no_import_cycle_among_core_modules() -> None:
    names = {_module_name(p): p for p in MODULES}
    graph = {n: {t for t in _imports(p) if t in names and t != n and t != "rsslctl"} for n, p in names.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


#: The layers of the core, lowest first. A module imports only from its own subpackage or from a lower layer;
#: ``nn`` and ``data`` share a level and stay independent of each other. The root (``rsslctl``, the public API)
#: re-exports every layer and is imported by the core only for ``__version__`` and ``hookimpl``.
LAYERS = {"base": 0, "runtime": 1, "nn": 2, "data": 2, "adversary": 3, "method": 4, "run": 5, "train": 6, "eval": 7,
          "sweep": 8, "cli": 9}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_core_module_belongs_to_a_layer() -> None:
    stray = [n for n in map(_module_name, MODULES)
             if n not in ("rsslctl", "rsslctl.__main__") and _layer(n) not in LAYERS]
    assert not stray, f"modules outside every layer (add them to a layer subpackage): {stray}"


def test_layers_import_only_downward() -> None:
    wrong = []
    for path in MODULES:
        name = _module_name(path)
        if name in ("rsslctl", "rsslctl.__main__"):
            continue
        for target in _imports(path):
            if target in ("rsslctl.__version__", "rsslctl.hookimpl", "rsslctl"):
                continue
            here, there = _layer(name), _layer(target)
            if here != there and LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports against the layer order " + str(list(LAYERS)) + ": " + ", ".join(sorted(wrong))


def test_the_core_imports_nothing_from_the_public_api_but_the_version_and_hookimpl() -> None:
    wrong = [f"{_module_name(p)} -> {t}" for p in MODULES if _module_name(p) != "rsslctl" for t in _imports(p)
             if t.startswith("rsslctl.") and t.count(".") == 1 and _layer(t) not in LAYERS
             and t not in ("rsslctl.__version__", "rsslctl.hookimpl", "rsslctl.__main__")]
    assert not wrong, wrong


def _builtin_plugin_names() -> set[str]:
    """Names of the methods, datasets, selectors and backbones the rsslctl distribution itself ships."""
    reg = registry()
    return {info.name for kind in ("method", "dataset", "coreset", "backbone") for infos in reg.entries(kind).values()
            for info in infos if info.package == "rsslctl"}


def test_core_never_names_a_builtin_plugin() -> None:
    names = _builtin_plugin_names()
    assert {"acl", "simclr", "digits", "timm", "rcs"} <= names  # the check below looks for real names
    found = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{path.relative_to(CORE)}:{node.lineno} {node.value!r}")
    assert not found, found


def test_no_core_comment_cites_a_file_outside_the_repository() -> None:
    assert not [p for p in MODULES if "METHODS.md" in p.read_text() or "PERFORMANCE.md" in p.read_text()]


# -- registry -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Opts:
    x: int = 1


def _method(name: str, options: type = _Opts) -> type:
    return type(name.title(), (), {"name": name, "Options": options, "__doc__": f"{name} test class"})


def _module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    return module


def test_a_name_registered_twice_is_an_error_naming_both_packages_and_can_be_picked() -> None:
    reg = Registry(load_entry_points=False)
    reg.register(_module("a", rsslctl_attacks=lambda: [_method("pgd")]), "rsslctl", "1")
    reg.register(_module("b", rsslctl_attacks=lambda: [_method("pgd")]), "thirdparty", "2")
    with pytest.raises(UserError, match="'rsslctl' and 'thirdparty'.*thirdparty:pgd"):
        reg.get("attack", "pgd", "attack.name")
    assert reg.info("attack", "thirdparty:pgd").package == "thirdparty"
    assert all("also provided by" in info.error for info in reg.all() if info.name == "pgd")


@pytest.mark.parametrize("hooks, message", [
    ({"rsslctl_method": lambda: []}, "unknown hook 'rsslctl_method' (did you mean 'rsslctl_methods'?)"),
    ({"rsslctl_methods": lambda: 42}, "returned int, expected a list"),
    ({"rsslctl_methods": lambda: [42]}, "not a class"),
    ({"rsslctl_methods": lambda: [_method("")]}, "no valid 'name'"),
    ({"rsslctl_methods": lambda: [_method("m", options=int)]}, "Options is not a dataclass"),
    ({"rsslctl_methods": lambda: [_method("m", options=dataclasses.make_dataclass("O", [("y", int)]))]},
     "field 'y' has no default"),
    ({"rsslctl_methods": lambda: (_ for _ in ()).throw(SystemExit(3))}, "SystemExit: 3"),
    ({"rsslctl_commands": lambda: ["not a command"]}, "not a click command"),
])
def test_a_broken_plugin_is_reported_and_others_keep_working(hooks: dict, message: str) -> None:
    reg = Registry(load_entry_points=False)
    reg.register(_module("good", rsslctl_methods=lambda: [_method("fine")]), "goodpkg", "1")
    reg.register(_module("bad", **hooks), "badpkg", "1")
    reg.commands()
    assert reg.get("method", "fine").name == "fine"
    errors = [info.error for info in reg.all() if info.cls is None]
    assert any(message in e for e in errors), errors


def test_an_entry_point_that_exits_at_import_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    class ExitingEntryPoint:
        name, dist = "exits", None

        def load(self) -> None:
            raise SystemExit(3)

    monkeypatch.setattr(md, "entry_points", lambda group: [ExitingEntryPoint()] if group == "rsslctl" else [])
    reg = Registry()
    assert [(i.name, i.error) for i in reg.all()] == [("exits", "SystemExit: 3")]


def test_recipe_validation_runs_the_plugins_checks(tmp_path: Path) -> None:
    from rsslctl.run.recipe import load
    path = tmp_path / "r.toml"
    path.write_text('[backbone]\nname = "timm"\nmodel = "resnet19"\n')
    with pytest.raises(UserError, match="unknown timm model 'resnet19'.*did you mean 'resnet18'"):
        load(path)


# -- lazy declarations --------------------------------------------------------------------------------------------
class _EntryPoint:
    """A stand-in for an installed entry point: ``load`` counts imports and returns (or raises) what it is given."""

    def __init__(self, name: str, module: Any, group: str) -> None:
        self.name, self.module, self.group, self.loads = name, module, group, 0
        self.dist = types.SimpleNamespace(metadata={"Name": "lazypkg"}, version="1")

    def load(self) -> Any:
        self.loads += 1
        if isinstance(self.module, BaseException):
            raise self.module
        return self.module


def _lazy_registry(monkeypatch: pytest.MonkeyPatch, implementation: Any) -> tuple[Registry, _EntryPoint]:
    declared = Declared("method", "fine", "impl", "fine test class", _Opts, citation="@misc{x}")
    light = _EntryPoint("light", _module("light", rsslctl_declarations=lambda: [declared]), "rsslctl.declarations")
    heavy = _EntryPoint("impl", implementation, "rsslctl")
    monkeypatch.setattr(md, "entry_points", lambda group: [e for e in (light, heavy) if e.group == group])
    return Registry(), heavy


def test_a_declared_plugin_is_listed_and_validated_without_importing_its_module(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reg, heavy = _lazy_registry(monkeypatch, _module("impl", rsslctl_methods=lambda: [_method("fine")]))
    info = reg.info("method", "fine")
    assert (info.options, info.citation, info.doc, heavy.loads) == (_Opts, "@misc{x}", "fine test class", 0)
    assert [i.name for i in reg.all()] == ["fine"] and heavy.loads == 0
    assert reg.get("method", "fine").name == "fine" and heavy.loads == 1
    reg.get("method", "fine")
    assert heavy.loads == 1 and reg.names("method") == ["fine"]  # loaded once; the class replaced its declaration


def test_a_declared_plugin_whose_module_fails_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    reg, _ = _lazy_registry(monkeypatch, ImportError("no such thing"))
    with pytest.raises(UserError, match="method 'fine' of package 'lazypkg' failed to load: ImportError: no such"):
        reg.get("method", "fine")
    reg, _ = _lazy_registry(monkeypatch, _module("impl"))  # imports fine, provides nothing
    with pytest.raises(UserError, match="does not provide it"):
        reg.get("method", "fine")
