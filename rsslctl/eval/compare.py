"""`rsslctl compare`: the evaluations of many runs, grouped by their resolved recipe minus the seed, as mean ± standard
deviation and a 95 % Student-t interval per measured figure.

One row of the comparison is one group (runs whose recipes are equal but for ``run.seed``) evaluated one way (the
linear probe or a fine-tuning mode) with one set of evaluation settings: runs measured with different settings are
never averaged together, they form rows of their own and the settings that differ become columns.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

from rsslctl.base.errors import UserError
from rsslctl.eval import store
from rsslctl.eval.metrics import METRICS
from rsslctl.run.directory import RECIPE_FILE, is_run_dir

SWEEP_FILE = "sweep.json"
#: recipe keys that name or place a run, or only change what it logs: never a reason to keep runs apart
IGNORED = ("run.seed", "run.name", "run.output_dir")
IGNORED_TABLES = ("logging.", "evaluation.")  # evaluation: compared through each result's own settings instead
MODES = ("SLF", "ALF", "AFF")
LEVEL = 0.95


@dataclasses.dataclass
class Measured:
    """One evaluation of one run: its figures in percent, the settings that decided them (flat, dotted keys)."""

    run: Path
    seed: Any
    recipe: dict[str, Any]
    protocol: str  # "probe" (linear probe of the pretraining run) or a fine-tuning mode
    settings: dict[str, Any]
    figures: dict[str, float]
    eps_curve: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    eps_unit: str = ""


def flat(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become tuples so that values compare and hash."""
    out: dict[str, Any] = {}
    for k, v in value.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat(v, key + ".") if v else {key: "{}"})
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


# -- inputs --------------------------------------------------------------------------------------------------------
def expand(paths: Iterable[Path]) -> tuple[list[Path], list[str], dict[Path, str]]:
    """Run directories named by ``paths`` (a sweep directory stands for its finished runs), each once; notes on the
    runs of a sweep that are left out; the name of the path each run came from (a sweep's or a run's directory
    name). A path that is neither is a UserError."""
    runs: list[Path] = []
    notes: list[str] = []
    source: dict[Path, str] = {}
    for path in map(Path, paths):
        if (path / SWEEP_FILE).is_file():
            done, left = sweep_runs(path)
            runs += done
            source.update({r.resolve(): path.resolve().name for r in done})
            if left:
                notes.append(f"{path}: {len(left)} run(s) of the sweep not finished, left out ({', '.join(left[:5])})")
        elif path.is_dir() and is_run_dir(path):
            runs.append(path)
            source.setdefault(path.resolve(), path.resolve().name)
        elif not path.exists():
            raise UserError(f"{path}: not found; pass run directories or sweep directories (with {SWEEP_FILE})")
        else:
            raise UserError(f"{path}: not an rsslctl run directory (no {RECIPE_FILE}) nor a sweep directory (no "
                            f"{SWEEP_FILE}); pass directories that `rsslctl pretrain` or `rsslctl sweep` created")
    seen: set[Path] = set()
    unique = []
    for run in runs:
        if run.resolve() not in seen:
            seen.add(run.resolve())
            unique.append(run)
    return unique, notes, source


def sweep_runs(sweep_dir: Path) -> tuple[list[Path], list[str]]:
    """(finished run directories, names of the others) of a sweep directory's ``sweep.json``."""
    path = sweep_dir / SWEEP_FILE
    try:
        sweep = json.loads(path.read_text())
        entries = sweep["runs"]
        if sweep.get("format") != "rsslctl-sweep" or not isinstance(entries, list):
            raise ValueError("not an rsslctl sweep file")
        done = [sweep_dir / r["dir"] for r in entries if r.get("status") == "done"]
        left = [str(r.get("name", r.get("dir"))) for r in entries if r.get("status") != "done"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable sweep file ({exc}); pass the directory `rsslctl sweep` wrote") from None
    missing = [str(d) for d in done if not is_run_dir(d)]
    if missing:
        raise UserError(f"{path}: run {missing[0]} is marked done but is not a run directory; re-run the sweep")
    return done, left


def run_recipe(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """(seed, the flat resolved recipe without the keys in ``IGNORED``) of a run."""
    try:
        raw = tomllib.loads((run_dir / RECIPE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{run_dir / RECIPE_FILE}: unreadable recipe ({exc})") from None
    recipe = flat(raw)
    keep = {k: v for k, v in recipe.items() if k not in IGNORED and not k.startswith(IGNORED_TABLES)}
    return recipe.get("run.seed"), keep


def measurements(run_dir: Path) -> list[Measured]:
    """Every evaluation of a run: its linear-probe evaluations (any number of settings) and its fine-tuned modes."""
    seed, recipe = run_recipe(run_dir)
    out = []
    for settings, result in store.load_all(run_dir):
        figures = {"clean": result["clean_accuracy"], f"PGD-{result['attack']['steps']}": result["robust_accuracy"]}
        if result.get("knn"):
            figures["kNN"] = result["knn"]["accuracy"]
        out.append(Measured(run_dir, seed, recipe, "probe", {**flat(settings), "checkpoint epoch": result.get("epoch")},
                            {k: 100 * v for k, v in figures.items()}))
    for mode in MODES:  # evaluation/<settings key>/<MODE>.json, and the single-folder layout of older runs
        for path in [*sorted((run_dir / "evaluation").glob(f"*/{mode}.json")), run_dir / "evaluation" / f"{mode}.json"]:
            if path.is_file():
                out.append(suite_measured(run_dir, seed, recipe, mode, _read(path)))
    return out


def suite_measured(run_dir: Path, seed: Any, recipe: dict[str, Any], mode: str, r: dict[str, Any]) -> Measured:
    """A fine-tuned mode's result: the report columns of the registered metrics, its suite and fine-tuning settings."""
    import rsslctl.eval.suite  # noqa: F401  registers the built-in metrics, whose columns read the result

    figures = {}
    for m in METRICS.values():
        for title, get in m.columns:
            try:
                value = get(r)
            except (KeyError, TypeError):
                value = None
            if value is not None:
                name = {"SA": "clean", "PGD": f"PGD-{r['pgd']['steps']}", "AA (RA)": "AutoAttack"}.get(title, title)
                figures[name] = 100 * value
    finetune = {k: v for k, v in (r.get("finetune") or {}).items() if k not in ("mode", "hp_source")}
    settings = {**flat(r.get("settings", {})), "test_images": r.get("test_images"), "dataset": r.get("dataset"),
                **flat(finetune, "finetune.")}
    linf = r.get("pgd", {}).get("norm", "linf") == "linf"
    curve = [(p["eps"] * (255 if linf else 1), 100 * p["accuracy"]) for p in r.get("eps_curve") or []]
    return Measured(run_dir, seed, recipe, mode, settings, figures, curve, "ε (×1/255, L∞)" if linf else "ε (L2)")


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return value
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable evaluation file ({exc}); re-run `rsslctl evaluate --force`") from None


def training_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(epoch, mean loss) per finished epoch from the run's metrics.jsonl (empty when it has none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    curve = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(rec, dict) and rec.get("kind") == "epoch" and isinstance(rec.get("loss"), (int, float)):
            curve[int(rec["epoch"])] = float(rec["loss"])
    return sorted(curve.items())


# -- statistics ----------------------------------------------------------------------------------------------------
def summarize(values: list[float], level: float = LEVEL) -> dict[str, Any]:
    """n, mean, sample standard deviation (n - 1) and the two-sided Student-t interval of the mean at ``level``; the
    spread and interval are None for a single value."""
    from scipy.stats import t

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci": None, "values": values}
    std = statistics.stdev(values)
    half = float(t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci": [mean - half, mean + half], "values": values}


def _mean_curve(curves: list[list[tuple[float, float]]]) -> list[dict[str, Any]]:
    """Mean (and spread) over runs at each x every run has."""
    if not curves or not all(curves):
        return []
    xs = sorted(set.intersection(*({x for x, _ in c} for c in curves)))
    rows = []
    for x in xs:
        ys = [dict(c)[x] for c in curves]
        rows.append({"x": x, "mean": statistics.fmean(ys), "std": statistics.stdev(ys) if len(ys) > 1 else None})
    return rows


# -- the comparison ------------------------------------------------------------------------------------------------
def _key(d: Mapping[str, Any]) -> str:
    return json.dumps(sorted(d.items(), key=lambda kv: kv[0]), default=str)


def compare(paths: Iterable[Path], columns: list[str] | None = None) -> dict[str, Any]:
    """The comparison of the runs and sweeps named by ``paths`` (see the module doc); a UserError when none of them
    holds an evaluation. With several sweeps every row is named by the sweep directory its runs came from (``name``).
    ``columns`` chooses the recipe and evaluation-setting columns shown (default: every key that differs between
    rows); rows are grouped by the whole recipe either way."""
    paths = list(paths)
    runs, notes, source = expand(paths)
    measured: list[Measured] = []
    unevaluated = []
    for run in runs:
        found = measurements(run)
        measured += found
        if not found:
            unevaluated.append(str(run))
    if not measured:
        raise UserError(f"no evaluated run among {len(runs)} run(s) ({', '.join(unevaluated[:3])}); run "
                        "`rsslctl evaluate RUN` (or `rsslctl finetune RUN`) first")
    if unevaluated:
        notes.append(f"{len(unevaluated)} run(s) without any evaluation, left out: {', '.join(unevaluated[:5])}")
    rows: dict[tuple[str, str, str], list[Measured]] = {}
    for m in measured:
        rows.setdefault((_key(m.recipe), m.protocol, _key(m.settings)), []).append(m)
    recipe_cols = _differing([m.recipe for m in measured])
    setting_cols = {p: _differing([m.settings for m in measured if m.protocol == p])
                    for p in dict.fromkeys(m.protocol for m in measured)}
    differing_settings = {p: cols for p, cols in setting_cols.items() if cols}
    if columns is not None:
        known = {k for m in measured for k in (*m.recipe, *m.settings)}
        unknown = [c for c in columns if c not in known]
        if unknown:
            differ = recipe_cols + sorted({c for cols in setting_cols.values() for c in cols})
            raise UserError(f"--columns {unknown[0]}: no compared run has this recipe key or evaluation setting; "
                            f"keys that differ here: {', '.join(differ) or 'none'}")
        hidden = [c for c in recipe_cols if c not in columns]
        if hidden:
            notes.append(f"{len(hidden)} recipe key(s) that differ between rows are not shown (--columns): "
                         f"{', '.join(hidden[:8])}{' …' if len(hidden) > 8 else ''}")
        recipe_cols = [c for c in columns if any(c in m.recipe for m in measured)]
        setting_cols = {p: [c for c in columns if c not in recipe_cols and any(c in m.settings for m in measured
                                                                                if m.protocol == p)]
                        for p in setting_cols}
    figures = list(dict.fromkeys(f for m in measured for f in m.figures))
    out_rows = []
    for (_, protocol, _), group in rows.items():
        first = group[0]
        seeds = [m.seed for m in group]
        doubled = sorted({str(s) for s in seeds if seeds.count(s) > 1})
        if doubled:
            notes.append(f"{first.run}: seed(s) {', '.join(doubled)} appear more than once in a group "
                         "(copies of one run?); each copy counts")
        out_rows.append({
            "name": ", ".join(dict.fromkeys(source.get(m.run.resolve(), m.run.name) for m in group)),
            "recipe": {k: first.recipe.get(k) for k in recipe_cols},
            "evaluation": protocol,
            "settings": {k: first.settings.get(k) for k in setting_cols[protocol]},
            "all_settings": first.settings,
            "seeds": seeds, "runs": [str(m.run) for m in group],
            "figures": {f: summarize([m.figures[f] for m in group]) for f in figures
                        if all(f in m.figures for m in group)},
            "eps_curve": _mean_curve([m.eps_curve for m in group]), "eps_unit": first.eps_unit,
            "training": _mean_curve([training_curve(m.run) for m in group]),
        })
    for p, cols in differing_settings.items():
        if cols:
            notes.append(f"{p}: runs were evaluated with different settings ({', '.join(cols)}); "
                         "they are kept in separate rows, never averaged together")
    return {"format": "rsslctl-compare", "version": 1, "unit": "%", "level": LEVEL,
            "name_column": sum((Path(p) / SWEEP_FILE).is_file() for p in paths) > 1, "recipe_columns": recipe_cols,
            "setting_columns": list(dict.fromkeys(c for cols in setting_cols.values() for c in cols)),
            "figures": figures, "rows": out_rows, "notes": notes}


def _differing(dicts: list[dict[str, Any]]) -> list[str]:
    """Keys whose value is not the same in every dict (a key some lack counts as differing)."""
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return [k for k in keys if len({json.dumps(d.get(k), default=str) for d in dicts}) > 1]
