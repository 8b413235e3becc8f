"""The core names no dataset: the display names of the built-in datasets (their titles and the fine-tuning table
columns they declare) appear in no string constant of ``rsslctl/``; the datasets declare them, the core reads them."""
from __future__ import annotations

import ast
from pathlib import Path

from rsslctl.base.registry import registry
from rsslctl.train.classify import cells, every_column, finetune_columns, resolve_config

CORE = Path(__file__).resolve().parents[1] / "rsslctl"


def _builtin_dataset_display_names() -> set[str]:
    names = set()
    for infos in registry().entries("dataset").values():
        for info in infos:
            if info.package == "rsslctl":
                names |= set(info.cls.finetune_columns) | {getattr(info.cls, "title", "")} - {""}
    return names


def test_core_string_constants_never_name_a_builtin_dataset() -> None:
    names = _builtin_dataset_display_names()
    assert {"CIFAR-10", "CIFAR-100", "STL-10 96px", "STL-10 32px"} <= names  # the check below looks for real names
    found = [f"{path.relative_to(CORE)}:{node.lineno} {node.value!r}" for path in sorted(CORE.rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip() in names]
    assert not found, found


def test_the_table_columns_come_from_the_dataset_plugins() -> None:
    columns = finetune_columns()
    declared = {t for infos in registry().entries("dataset").values() for t in infos[0].cls.finetune_columns}
    assert set(columns) == declared and len(columns) == len(declared)
    assert columns[:2] == ("CIFAR-10", "CIFAR-100")  # the positional layout the built-in method tables are written in
    table = cells((1, 0.1), None, (3, 0.3), milestones=(5,))
    assert dict(table) == {columns[0]: {"batch_size": 1, "lr": 0.1, "milestones": (5,)},
                           columns[2]: {"batch_size": 3, "lr": 0.3, "milestones": (5,)}}
    same = every_column(lr=0.5) | {columns[1]: {"lr": 0.7}}
    assert {k: v["lr"] for k, v in same.items()} == {**{c: 0.5 for c in columns}, columns[1]: 0.7}
    rows = {"R": {"SLF": table}}
    assert resolve_config("SLF", rows, "R", columns[2]).lr == 0.3
    first = resolve_config("SLF", rows, "R", "")  # a dataset without a column of its own reads the first
    assert first.lr == 0.1 and "no column of its own" in first.hp_source


def test_a_dataset_declares_its_column_by_image_size() -> None:
    stl = registry().get("dataset", "stl10")
    assert (stl.hyperparameter_column(96), stl.hyperparameter_column(32)) == ("STL-10 96px", "STL-10 32px")
    assert registry().get("dataset", "cifar100").hyperparameter_column(32) == "CIFAR-100"
    assert registry().get("dataset", "digits").hyperparameter_column(32) == ""
