"""Linear-probe evaluations of a run, kept apart per setting: ``RUN/eval/<key>/results.json`` with the settings that
decided its numbers in ``settings.json`` beside it, ``key`` a hash of those settings. A second evaluation with other
settings (``--knn``, another attack, ``--set evaluation.steps=50``) adds a directory; ``--force`` replaces only the
one with the same settings. Runs written before this layout hold a single ``RUN/eval.json``; it still loads, with
its settings read back from the file (and the run's recipe for what the file did not record)."""
from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Mapping

from rsslctl.base.errors import UserError
from rsslctl.run.directory import RECIPE_FILE
from rsslctl.runtime.checkpoint import atomic_write_text

STORE_DIR = "eval"
RESULTS_FILE = "results.json"
SETTINGS_FILE = "settings.json"
LEGACY_FILE = "eval.json"  # the single evaluation file of runs written before the per-setting layout
PROTOCOL = "linear_probe"


def settings_key(settings: Mapping[str, Any]) -> str:
    """A short stable hash of ``settings`` (canonical JSON: sorted keys, floats as Python writes them)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def probe_settings(evaluation: Mapping[str, Any], route: str, test_images: int, data: Mapping[str, Any],
                   knn: bool) -> dict[str, Any]:
    """What decides a linear-probe result: the probe and attack settings, the BN route, the test images and splits,
    the data values given at evaluation time that differ from training (``data``), and the kNN settings if run."""
    e = evaluation
    return {"protocol": PROTOCOL, "route": route, "test_images": int(test_images),
            "probe": {"epochs": e["epochs"], "lr": e["lr"], "batch_size": e["batch_size"],
                      "weight_decay": e["weight_decay"]},
            "attack": {"name": e["attack"], "eps": e["eps"], "step_size": e["step_size"], "steps": e["steps"],
                       "clamp_start": e["clamp_start"]},
            "data": dict(sorted(data.items())),
            "knn": {"k": e["knn_k"], "temperature": e["knn_temperature"]} if knn else None}


def result_dir(run_dir: Path, settings: Mapping[str, Any]) -> Path:
    return Path(run_dir) / STORE_DIR / settings_key(settings)


def check_free(run_dir: Path, settings: Mapping[str, Any], force: bool) -> None:
    """Refuse (unless ``force``) when an evaluation with exactly these settings exists, here or in a legacy file."""
    path = result_dir(run_dir, settings) / RESULTS_FILE
    legacy = _legacy(Path(run_dir))
    if not force and (path.is_file() or (legacy is not None and legacy[0] == dict(settings))):
        shown = path if path.is_file() else Path(run_dir) / LEGACY_FILE
        raise UserError(f"{shown}: an evaluation with these settings already exists; pass --force to replace it "
                        "(other settings are kept apart and need no --force)")


def save(run_dir: Path, settings: Mapping[str, Any], result: Mapping[str, Any]) -> Path:
    """Write one evaluation (settings first, results last, each atomically); a legacy ``eval.json`` with the same
    settings is replaced by it, one with other settings moves into the store so that it is kept."""
    run_dir = Path(run_dir)
    legacy = _legacy(run_dir)
    if legacy is not None:
        old_settings, old = legacy
        if old_settings != dict(settings):
            _write(result_dir(run_dir, old_settings), old_settings, old)
        (run_dir / LEGACY_FILE).unlink()
    return _write(result_dir(run_dir, settings), settings, result)


def _write(folder: Path, settings: Mapping[str, Any], result: Mapping[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / SETTINGS_FILE, json.dumps(settings, indent=2))
    atomic_write_text(folder / RESULTS_FILE, json.dumps(result, indent=2))
    return folder / RESULTS_FILE


def load_all(run_dir: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every linear-probe evaluation of ``run_dir`` as (settings, result), per-setting ones first (by key), then a
    legacy ``eval.json``. An unreadable file is a UserError naming it."""
    run_dir = Path(run_dir)
    out = []
    for path in sorted((run_dir / STORE_DIR).glob(f"*/{RESULTS_FILE}")):
        out.append((_read(path.with_name(SETTINGS_FILE)), _read(path)))
    legacy = _legacy(run_dir)
    if legacy is not None:
        out.append(legacy)
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable evaluation file ({exc}); re-run `rsslctl evaluate --force`") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not an rsslctl evaluation file (expected a JSON object)")
    return value


def _legacy(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(settings, result) of a single-file evaluation of the previous layout, settings read back from what it
    recorded; what it did not record (weight decay, splits) comes from the run's recipe, as that evaluation used."""
    path = run_dir / LEGACY_FILE
    if not path.is_file():
        return None
    result = _read(path)
    try:
        recipe = tomllib.loads((run_dir / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        recipe = {}
    ev = dict(recipe.get("evaluation", {}))
    attack, probe = result.get("attack", {}), result.get("probe", {})
    ev.update({k: probe[k] for k in ("epochs", "lr", "batch_size", "weight_decay") if k in probe})
    ev.update({"attack": attack.get("name", ev.get("attack")),
               **{k: attack[k] for k in ("eps", "step_size", "steps", "clamp_start") if k in attack}})
    knn = result.get("knn")
    if knn:
        ev.update({"knn_k": knn["k"], "knn_temperature": knn["temperature"]})
    try:
        settings = probe_settings(ev, result["route"], result["test_images"], {}, bool(knn))
    except KeyError as exc:
        raise UserError(f"{path}: evaluation file lacks {exc}; re-run `rsslctl evaluate --force`") from None
    return settings, result
