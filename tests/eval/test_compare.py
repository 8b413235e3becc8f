"""`rsslctl compare` on fake run directories: grouping by recipe minus the seed, the statistics (recomputed here from
their formulas), evaluation settings never averaged together, sweeps, the formats and the one-line refusals."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import assert_user_error, run

from rsslctl.eval import store
from rsslctl.eval.compare import compare

# Student t quantiles t_{0.975, df} from a printed table (not from the code under test)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}

EVAL = {"epochs": 30, "lr": 0.1, "batch_size": 256, "weight_decay": 2e-4, "route": "auto", "attack": "pgd",
        "single_step_attack": "fgsm", "eps": 8 / 255, "step_size": 2 / 255, "steps": 20, "clamp_start": True,
        "limit": 0, "knn_k": 20, "knn_temperature": 0.07}


def fake_run(root: Path, name: str, seed: int, method: str = "acl", epochs: int = 10, probe: tuple | None = None,
             steps: int = 20, knn: float | None = None, legacy: bool = False, modes: dict | None = None,
             losses: list[float] = ()) -> Path:
    """A run directory as rsslctl writes it: marker, recipe, metrics.jsonl and evaluation files (no weights)."""
    d = root / name
    d.mkdir(parents=True)
    (d / ".rsslctl-run").write_text('{"format": "rsslctl-run/1"}\n')
    ev = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**EVAL, "steps": steps}.items())
    (d / "recipe.toml").write_text(f'[run]\nname = "{name}"\nseed = {seed}\noutput_dir = "{root}"\n\n'
                                   f'[method]\nname = "{method}"\n\n[schedule]\nepochs = {epochs}\n\n'
                                   f'[logging]\ncsv = {"true" if seed % 2 else "false"}\n\n[evaluation]\n{ev}\n')
    (d / "metrics.jsonl").write_text("".join(json.dumps({"kind": "epoch", "epoch": i + 1, "loss": v}) + "\n"
                                             for i, v in enumerate(losses)))
    if probe is not None:
        result = {"epoch": epochs, "route": "pgd", "test_images": 100, "clean_accuracy": probe[0],
                  "robust_accuracy": probe[1], "attack": {"name": "pgd", "eps": 8 / 255, "step_size": 2 / 255,
                                                          "steps": steps, "clamp_start": True},
                  "probe": {"epochs": 30, "lr": 0.1, "batch_size": 256}}
        if knn is not None:
            result["knn"] = {"accuracy": knn, "k": 20, "temperature": 0.07, "test_images": 100}
        if legacy:
            (d / "eval.json").write_text(json.dumps(result))
        else:
            result["probe"]["weight_decay"] = 2e-4
            store.save(d, store.probe_settings({**EVAL, "steps": steps}, "pgd", 100, {}, knn is not None), result)
    for mode, (clean, pgd, aa, curve) in (modes or {}).items():
        (d / "evaluation").mkdir(exist_ok=True)
        r = {"mode": mode, "test_images": 50, "dataset": "digits", "clean_accuracy": clean,
             "settings": {"eps": 8 / 255, "pgd_steps": 20, "autoattack": aa is not None},
             "pgd": {"accuracy": pgd, "steps": 20, "norm": "linf", "eps": 8 / 255},
             "eps_curve": [{"eps": e / 255, "accuracy": a} for e, a in curve],
             "finetune": {"mode": mode, "epochs": 25, "lr": 0.01, "seed": 0, "hp_source": "table"}}
        if aa is not None:
            r["autoattack"] = {"robust_accuracy": aa}
        (d / "evaluation" / f"{mode}.json").write_text(json.dumps(r))
    return d


def stats(values: list[float]) -> tuple[float, float, float, float]:
    """mean, sample std and the 95 % t interval, written out from their definitions."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T975[n - 1] * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """acl × 3 seeds (one of them an old single-file evaluation), simclr × 2 seeds, one unevaluated run."""
    for seed, (c, r) in enumerate([(0.80, 0.40), (0.84, 0.46), (0.79, 0.41)]):
        fake_run(tmp_path, f"acl-{seed}", seed, probe=(c, r), legacy=seed == 2, losses=[3.0 - seed / 10, 2.0, 1.5])
    for seed, (c, r) in enumerate([(0.70, 0.30), (0.74, 0.31)]):
        fake_run(tmp_path, f"simclr-{seed}", seed, method="simclr", probe=(c, r), losses=[4.0, 3.0, 2.5])
    fake_run(tmp_path, "empty", 7)
    return tmp_path


def _rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["recipe"]["method.name"]: r for r in result["rows"]}


def test_groups_by_recipe_minus_seed_with_mean_std_and_t_interval(runs: Path) -> None:
    result = compare(sorted(runs.iterdir()))
    assert result["recipe_columns"] == ["method.name"]  # seed, name, logging: not a difference
    rows = _rows(result)
    assert sorted(rows["acl"]["seeds"]) == [0, 1, 2] and sorted(rows["simclr"]["seeds"]) == [0, 1]
    for method, values in (("acl", [[80, 84, 79], [40, 46, 41]]), ("simclr", [[70, 74], [30, 31]])):
        for figure, vals in zip(("clean", "PGD-20"), values):
            s = rows[method]["figures"][figure]
            mean, std, lo, hi = stats(vals)
            assert s["n"] == len(vals)
            assert s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
            assert s["ci"] == pytest.approx([lo, hi], abs=2e-3)  # the table's t has three decimals
    assert any("without any evaluation" in n and "empty" in n for n in result["notes"])


def test_different_evaluation_settings_are_never_averaged(tmp_path: Path) -> None:
    fake_run(tmp_path, "a", 0, probe=(0.8, 0.4))
    fake_run(tmp_path, "b", 1, probe=(0.9, 0.5))
    fake_run(tmp_path, "c", 2, probe=(0.7, 0.2), steps=50)  # same recipe, evaluated with PGD-50
    result = compare([tmp_path / n for n in "abc"])
    assert len(result["rows"]) == 2 and result["recipe_columns"] == []
    assert "attack.steps" in result["setting_columns"]
    by_steps = {r["settings"]["attack.steps"]: r for r in result["rows"]}
    assert by_steps[20]["figures"]["clean"]["n"] == 2 and by_steps[50]["figures"]["clean"]["values"] == [70]
    assert "PGD-50" in by_steps[50]["figures"] and "PGD-50" not in by_steps[20]["figures"]
    assert any("never averaged" in n and "attack.steps" in n for n in result["notes"])


def test_evaluations_of_one_run_with_other_settings_are_kept_apart(tmp_path: Path) -> None:
    d = fake_run(tmp_path, "a", 0, probe=(0.8, 0.4), legacy=True)
    s = store.probe_settings(EVAL, "pgd", 100, {}, knn=True)
    assert len(store.load_all(d)) == 1  # the old single file loads
    store.check_free(d, s, force=False)  # other settings: no --force needed
    store.save(d, s, {"epoch": 10, "clean_accuracy": 0.81, "robust_accuracy": 0.39, "attack": {"steps": 20},
                      "knn": {"accuracy": 0.7}})
    assert not (d / "eval.json").exists()  # moved into the store, not lost
    found = store.load_all(d)
    assert len(found) == 2 and {r["clean_accuracy"] for _, r in found} == {0.8, 0.81}
    with pytest.raises(Exception, match="--force"):
        store.check_free(d, s, force=False)
    old = next(st for st, r in found if r["clean_accuracy"] == 0.8)
    with pytest.raises(Exception, match="--force"):
        store.check_free(d, old, force=False)
    assert (store.result_dir(d, s) / "settings.json").is_file()
    rows = compare([d])["rows"]
    assert len(rows) == 2 and {tuple(sorted(r["figures"])) for r in rows} == {("PGD-20", "clean"),
                                                                             ("PGD-20", "clean", "kNN")}


def test_fine_tuning_modes_and_sweeps(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    entries = []
    for seed, clean in enumerate([0.6, 0.64, 0.0]):
        fake_run(sweep / "runs", f"s{seed}", seed, modes={"SLF": (clean, clean / 2, None, [(0, clean), (8, clean / 2)]),
                                                          "AFF": (clean + 0.1, clean / 2, 0.2, [])})
        entries.append({"name": f"s{seed}", "dir": f"runs/s{seed}", "seed": seed, "overrides": {},
                        "status": "done" if seed < 2 else "running"})
    (sweep / "sweep.json").write_text(json.dumps({"format": "rsslctl-sweep", "version": 1, "sweep_hash": "x",
                                                  "runs": entries}))
    result = compare([sweep])
    rows = {r["evaluation"]: r for r in result["rows"]}
    assert set(rows) == {"SLF", "AFF"} and rows["SLF"]["seeds"] == [0, 1]
    assert rows["SLF"]["figures"]["clean"]["mean"] == pytest.approx(62)
    assert rows["AFF"]["figures"]["AutoAttack"]["values"] == [20, 20]
    assert "AutoAttack" not in rows["SLF"]["figures"]
    assert [p["x"] for p in rows["SLF"]["eps_curve"]] == pytest.approx([0, 8])
    assert rows["SLF"]["eps_curve"][0]["mean"] == pytest.approx(62)
    assert any("not finished" in n and "s2" in n for n in result["notes"])


def test_formats(runs: Path, tmp_path: Path) -> None:
    args = [str(p) for p in sorted(runs.iterdir())]
    mean, std, lo, hi = stats([80, 84, 79])
    md = run("compare", *args, "--format", "markdown")
    assert md.exit_code == 0, md.output
    assert "| acl | probe |" in md.stdout and f"{mean:.2f} ± {std:.2f}" in md.stdout
    table = run("compare", *args)
    assert table.exit_code == 0 and "simclr" in table.stdout and f"{mean:.2f} ± {std:.2f}" in table.stdout
    rows = list(csv.DictReader(io.StringIO(run("compare", *args, "--format", "csv").stdout)))
    acl = next(r for r in rows if r["method.name"] == "acl")
    assert float(acl["clean mean"]) == pytest.approx(mean) and float(acl["clean std"]) == pytest.approx(std)
    assert int(acl["clean n"]) == 3 and float(acl["clean ci_low"]) == pytest.approx(lo, abs=2e-3)
    data = json.loads(run("compare", *args, "--format", "json").stdout)
    assert data["format"] == "rsslctl-compare" and len(data["rows"]) == 2
    tex = run("compare", *args, "--format", "latex").stdout
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert f"${mean:.2f} \\pm {std:.2f}$" in tex and "method.name" in tex and "PGD-20" in tex
    assert all(line.count("&") == tex.splitlines()[3].count("&") for line in tex.splitlines() if "\\\\" in line)
    out = tmp_path / "cmp.html"
    assert run("compare", *args, "--format", "html", "--out", str(out)).exit_code == 0
    page = out.read_text()
    assert "<script" in page and "<svg" in page and "http://" not in page.replace('xmlns="http://www.w3.org', "")
    assert "https://" not in page


def test_bad_input_is_one_line(runs: Path, tmp_path: Path) -> None:
    assert_user_error(run("compare", str(tmp_path / "nowhere")), "not found")
    (tmp_path / "plain").mkdir()
    assert_user_error(run("compare", str(tmp_path / "plain")), "not an rsslctl run directory")
    assert_user_error(run("compare", str(runs / "empty")), "no evaluated run")
    assert_user_error(run("compare", str(runs / "acl-0"), "--format", "pdf"), "--format")
    out = tmp_path / "x.md"
    out.write_text("mine")
    assert_user_error(run("compare", str(runs / "acl-0"), "--format", "markdown", "--out", str(out)), "--force")
    assert out.read_text() == "mine"
    assert run("compare", str(runs / "acl-0"), "--format", "markdown", "--out", str(out), "--force").exit_code == 0
    assert "| acl | probe |" not in out.read_text() and "| probe | 1 |" in out.read_text()  # one run: no column
    assert_user_error(run("compare", str(runs / "acl-0"), "--out", str(runs / "acl-0" / "recipe.toml"), "--force"),
                      "reads")
    assert "[run]" in (runs / "acl-0" / "recipe.toml").read_text()
    beside = runs / "acl-0" / "compare.md"  # a new file next to what it reads is fine
    assert run("compare", str(runs / "acl-0"), "--format", "markdown", "--out", str(beside)).exit_code == 0
    (tmp_path / "bad-sweep").mkdir()
    (tmp_path / "bad-sweep" / "sweep.json").write_text("{not json")
    assert_user_error(run("compare", str(tmp_path / "bad-sweep")), "sweep.json", "unreadable")


def _sweep(root: Path, name: str, method: str, results: list[tuple[float, float]], epochs: int = 10) -> Path:
    sweep = root / name
    entries = []
    for seed, probe in enumerate(results):
        fake_run(sweep, f"r{seed}", seed, method=method, probe=probe, epochs=epochs)
        entries.append({"name": f"seed{seed}", "dir": f"r{seed}", "seed": seed, "overrides": {}, "status": "done"})
    (sweep / "sweep.json").write_text(json.dumps({"format": "rsslctl-sweep", "version": 1, "sweep_hash": name,
                                                  "runs": entries}))
    return sweep


def test_sweeps_name_their_rows_and_columns_choose_what_is_shown(tmp_path: Path) -> None:
    a = _sweep(tmp_path, "acl-board", "acl", [(0.8, 0.5), (0.82, 0.52)])
    b = _sweep(tmp_path, "simclr-board", "simclr", [(0.81, 0.3), (0.79, 0.32)], epochs=20)
    result = compare([a, b])
    assert result["name_column"] and result["recipe_columns"] == ["method.name", "schedule.epochs"]
    assert {r["name"]: r["recipe"]["method.name"] for r in result["rows"]} == {"acl-board": "acl",
                                                                            "simclr-board": "simclr"}
    md = run("compare", str(a), str(b), "--columns", "none", "--format", "markdown")
    assert md.exit_code == 0, md.output
    assert md.stdout.splitlines()[0] == "| name | evaluation | seeds | clean | PGD-20 |"
    assert "| acl-board | probe | 2 | 81.00 ± 1.41" in md.stdout
    assert "2 recipe key(s) that differ between rows are not shown (--columns): method.name, schedule.epochs" \
        in md.stdout
    only = compare([a, b], ["schedule.epochs"])
    assert only["recipe_columns"] == ["schedule.epochs"] and len(only["rows"]) == 2  # still grouped by the whole recipe
    one = compare([a])
    assert not one["name_column"]
    assert_user_error(run("compare", str(a), str(b), "--columns", "method.nme"), "--columns method.nme",
                      "method.name")
