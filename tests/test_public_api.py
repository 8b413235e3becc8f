"""The public plugin API: what ``rsslctl`` exports is a fixed, versioned list; plugins use nothing else."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import rsslctl

ROOT = Path(__file__).resolve().parents[1]

#: API 1.3 (1.1 added load_raw; 1.2 Declared, FileSource, decode_file and opt(earlier=...); 1.3
#: Method.parameter_groups). Changing this
#: list is an API change: bump ``rsslctl.__api_version__`` (MAJOR when a
#: name goes or changes meaning, MINOR when one is added) and say so in docs/plugins.md.
API = {
    "__api_version__", "__version__", "hookimpl",
    # base
    "TrainingDiverged", "UserError", "as_dict", "closest", "Number", "opt", "parse_number", "validate",
    "check_allocation", "check_model_kwargs", "MAX_IMAGE_SIZE", "console", "err_console", "summary_table",
    "get_plugin", "Declared",
    # runtime
    "all_gather_objects", "rank", "world_size", "atomic_write_text", "derive_seed", "load_optimizer_tensors",
    "optimizer_tensors", "save_checkpoint", "save_tensors",
    # nn
    "apply_cifar_stem", "Backbone", "Encoder", "fp32", "global_similarities", "nt_xent", "pair_rows",
    "positive_columns", "self_mask", "ema_update", "mlp_head", "momentum_copy", "MomentumSchedule", "make_optimizer",
    # data
    "Dataset", "FileSource", "decode_file", "ImageData", "ImageSource", "missing_data", "safe_unpickle", "HostRandom",
    "MIN_STRENGTH",
    "multi_view", "npz_memmap",
    # adversary
    "Attack", "eval_mode", "input_grad", "loss_and_grad", "make_attack", "Objective", "project", "projected_ascent",
    "random_start", "AdversarialTraining", "AdvTrainingOptions",
    # method
    "Method", "BankMethod", "NegativeQueue", "normalized_rows_grad", "softmax_logit_grad", "CoresetSelector",
    "CoresetTarget", "SelectionContext",
    # run
    "load_raw", "resolve", "check_replaceable", "load_run_recipe", "MARKER", "prepare_run_dir", "RECIPE_FILE",
    "refuse_existing", "RunLock", "build_method", "load_train_split", "load_trained_method", "plugin_versions",
    "setup_device",
    "FrozenTeacher",
    # train
    "cells", "Classifier", "crop_flip", "every_column", "extract_features", "LoopSettings", "MODES",
    "trades_adversary", "trades_loss", "train_classifier", "train_linear_probe",
    # cli
    "user_errors",
}


def test_the_exported_names_are_the_versioned_list() -> None:
    assert set(rsslctl.__all__) == API, "an API change: update API here and bump __api_version__"
    assert len(rsslctl.__all__) == len(set(rsslctl.__all__))
    assert rsslctl.__api_version__ == "1.3"


@pytest.mark.parametrize("name", sorted(API))
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(rsslctl, name) is not None


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        rsslctl.Trainer  # noqa: B018


def _plugin_files() -> list[Path]:
    return sorted((ROOT / "plugins").rglob("*.py")) + sorted((ROOT / "tests" / "example_plugin").rglob("*.py"))


@pytest.mark.parametrize("path", _plugin_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_public_api(path: Path) -> None:
    """Built-in plugins are ordinary plugins: ``from rsslctl import …`` names of ``__all__``, nothing deeper."""
    wrong = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rsslctl":
            if node.module != "rsslctl":
                wrong.append(f"line {node.lineno}: from {node.module}")
            wrong += [f"line {node.lineno}: {a.name} is not public" for a in node.names if a.name not in API]
        elif isinstance(node, ast.Import):
            wrong += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("rsslctl.")]
    assert not wrong, wrong


def test_importing_the_api_imports_no_torch() -> None:
    """A plugin module that registers hooks costs nothing until one of its classes is used."""
    code = ("import sys, rsslctl; from rsslctl import hookimpl; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('rsslctl.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_is_documented() -> None:
    """The API page is generated from docstrings (functions, classes) and ``#:`` comments (constants)."""
    import importlib
    import inspect
    import re
    bare = []
    for public, target in rsslctl._EXPORTS.items():
        module_name, _, attribute = target.partition(":")
        module = importlib.import_module(module_name)
        obj = getattr(module, attribute or public)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if not (obj.__doc__ or "").strip():
                bare.append(public)
        elif not re.search(r"#:[^\n]*\n(#:[^\n]*\n)*" + re.escape(attribute or public) + r"\b",
                           inspect.getsource(module)):
            bare.append(public)
    assert not bare, f"public names without a docstring or #: comment: {bare}"
