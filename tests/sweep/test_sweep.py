"""`rsslctl sweep`: expansion into hash-named runs, the manifest, skipping finished runs, resuming an interrupted one
exactly, one-line refusals that create nothing, and the Slurm path through submitit's own Local/Debug executors."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_user_error, run

from rsslctl.run.recipe import load
from rsslctl.run.sweep import SweepSpec, expand, recipe_hash, sweep_hash
from rsslctl.runtime.checkpoint import latest_checkpoint, load_checkpoint, read_meta
from rsslctl.sweep.executors import parse_time

#: one epoch of two steps, a short probe: a run pretrains and evaluates in seconds
FAST = ["schedule.epochs=1", "data.limit=64", "schedule.warmup_epochs=0", "evaluation.epochs=2",
        "evaluation.limit=32"]


@pytest.fixture
def fast_recipe(tiny_recipe: Path) -> Path:
    """The tiny recipe at one epoch of two steps and a two-epoch probe on 32 test images."""
    text = tiny_recipe.read_text().replace("steps = 2\nlimit = 64", "steps = 2\nlimit = 32")
    for old, new in (("limit = 96", "limit = 64"), ("epochs = 3\n", "epochs = 1\n"),
                     ("warmup_epochs = 1", "warmup_epochs = 0"),
                     ("[evaluation]\nepochs = 30", "[evaluation]\nepochs = 2")):
        text = text.replace(old, new)
    tiny_recipe.write_text(text)
    recipe = load(tiny_recipe)
    ev = recipe.evaluation
    assert (recipe.schedule.epochs, recipe.data.limit, ev.epochs, ev.limit) == (1, 64, 2, 32)
    return tiny_recipe


def _manifest(out: Path) -> dict:
    return json.loads((out / "sweep.json").read_text())


def test_expansion_is_the_product_with_hash_named_stable_dirs(tiny_recipe: Path) -> None:
    spec = SweepSpec(str(tiny_recipe), seeds=[0, 1, 2], grid={"method.temperature": [0.2, 0.5]})
    runs = expand(spec)
    assert len(runs) == 6
    assert [r.name for r in runs[:2]] == ["seed0-method.temperature=0.2", "seed0-method.temperature=0.5"]
    assert len({r.dir for r in runs}) == 6
    assert [r.dir for r in expand(spec)] == [r.dir for r in runs]  # same command, same directories
    first = runs[0]
    resolved = load(tiny_recipe, first.sets).resolved
    assert resolved["method"]["temperature"] == 0.2 and resolved["run"]["seed"] == 0
    assert first.dir == recipe_hash(resolved) and first.overrides == {"method.temperature": 0.2}
    # what a run is called, or where it would go by default, does not change what it computes
    assert recipe_hash(load(tiny_recipe, first.sets + ["run.name='x'", "run.output_dir='/elsewhere'"]).resolved) \
        == first.dir
    assert recipe_hash(load(tiny_recipe, first.sets + ["optimizer.lr=0.07"]).resolved) != first.dir
    # the steps after pretraining are part of the sweep's identity, not of the runs'
    other = SweepSpec(str(tiny_recipe), seeds=[0, 1, 2], grid={"method.temperature": [0.2, 0.5]}, after=[])
    assert [r.dir for r in expand(other)] == [r.dir for r in runs]
    assert sweep_hash(other, runs) != sweep_hash(spec, runs)


def test_time_limits_in_slurm_formats() -> None:
    assert [parse_time(t) for t in ("90", "1:30:00", "2-00:00:00", "1-12", "0:01:30")] == [90, 90, 2880, 2160, 2]


@pytest.mark.parametrize("args, fragments", [
    (["--grid", "method.temperatur=0.2,0.5"], ["unknown key 'temperatur'", "did you mean 'temperature'"]),
    (["--grid", "methd.temperature=0.2"], ["grid 'methd.temperature'", "unknown table"]),
    (["--grid", "method.temperature="], ["zero runs"]),
    (["--seeds", *map(str, range(17)), "--grid", "optimizer.lr=" + ",".join(f"0.0{i}" for i in range(1, 10))
      + ",0.1,0.11,0.12,0.13,0.14,0.15,0.16,0.17"], ["289 runs", "--yes"]),
    (["--grid", "optimizer.lr=0.1,0.1"], ["resolve to the same recipe"]),
    (["--after", "finetune:xyz"], ["finetune:slf"]),
    (["--executor", "slurm"], ["sbatch not found"]),
    (["--executor", "slurm", "--cluster", "debug", "--time", "soon"], ["--time 'soon'"]),
])
def test_bad_input_is_one_line_and_creates_nothing(tiny_recipe: Path, tmp_path: Path, args: list[str],
                                                    fragments: list[str]) -> None:
    out = tmp_path / "sweep"
    assert_user_error(run("sweep", str(tiny_recipe), "--out", str(out), *args), *fragments)
    assert not out.exists()


def test_slurm_without_submitit_is_refused(tiny_recipe: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit → ImportError
    out = tmp_path / "sweep"
    assert_user_error(run("sweep", str(tiny_recipe), "--out", str(out), "--executor", "slurm"),
                      "needs submitit", "rsslctl[slurm]")
    assert not out.exists()


def test_sweep_runs_skips_finished_and_refuses_another_sweep(fast_recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["--seeds", "0", "1", "--out", str(out), "--quiet", "--after", "none"]
    result = run("sweep", str(fast_recipe), *args)
    assert result.exit_code == 0, result.output
    manifest = _manifest(out)
    assert manifest["format"] == "rsslctl-sweep" and manifest["version"] == 1
    assert [(r["name"], r["seed"], r["status"]) for r in manifest["runs"]] == [("seed0", 0, "done"),
                                                                              ("seed1", 1, "done")]
    for r in manifest["runs"]:
        run_dir = out / r["dir"]
        assert read_meta(latest_checkpoint(run_dir))["epoch"] == 1
        assert load(run_dir / "recipe.toml").run.seed == r["seed"]
    stamps = {r["dir"]: latest_checkpoint(out / r["dir"]).stat().st_mtime_ns for r in manifest["runs"]}
    log = (out / "sweep.log").read_text()
    assert "seed0 (" in log and "done" in log

    again = run("sweep", str(fast_recipe), *args)
    assert again.exit_code == 0, again.output
    assert {r["dir"]: latest_checkpoint(out / r["dir"]).stat().st_mtime_ns for r in manifest["runs"]} == stamps
    assert (out / "sweep.log").read_text().splitlines()[-1].endswith("2 done or running elsewhere, 0 to run on local")

    before = (out / "sweep.json").read_text()
    assert_user_error(run("sweep", str(fast_recipe), "--seeds", "0", "1", "2", "--out", str(out), "--after", "none"),
                      "made by another sweep", "another --out")
    assert (out / "sweep.json").read_text() == before


def test_a_failed_run_is_reported_retried_and_the_others_finish(fast_recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["--seeds", "0", "--grid", "schedule.batch_size=32,128", "--out", str(out), "--quiet", "--after", "none"]
    # a batch of 128 from 64 images is refused when the run starts (the data is not read while expanding)
    result = run("sweep", str(fast_recipe), *args)
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("error: 1 of 2 runs failed (seed0-schedule.batch_size=128)") and "\n" not in err, err
    statuses = {r["name"]: r["status"] for r in _manifest(out)["runs"]}
    assert statuses == {"seed0-schedule.batch_size=32": "done", "seed0-schedule.batch_size=128": "failed"}
    bad = next(r["dir"] for r in _manifest(out)["runs"] if r["status"] == "failed")
    assert "batch" in (out / "logs" / f"{bad}.log").read_text().splitlines()[-1]
    assert "failed: pretrain exited with 2" in (out / "sweep.log").read_text()

    again = run("sweep", str(fast_recipe), *args)  # the failed run is tried again, the finished one is not
    assert again.exit_code == 1
    assert (out / "sweep.log").read_text().splitlines()[-3].endswith("1 done or running elsewhere, 1 to run on local")


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run_dir))[0]


def test_interrupted_sweep_resumes_to_the_uninterrupted_result(fast_recipe: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from rsslctl.train.engine import Trainer
    args = ["--seeds", "5", "--set", "schedule.epochs=2", "--after", "none", "--quiet"]
    full = tmp_path / "full"
    assert run("sweep", str(fast_recipe), "--out", str(full), *args).exit_code == 0

    original = Trainer._checkpoint

    def killed_after_epoch_1(self, epoch, *a, **kw):  # SIGINT right after the first checkpoint
        original(self, epoch, *a, **kw)
        raise KeyboardInterrupt(2)

    monkeypatch.setattr(Trainer, "_checkpoint", killed_after_epoch_1)
    broken = tmp_path / "broken"
    result = run("sweep", str(fast_recipe), "--out", str(broken), *args)
    assert result.exit_code == 130, result.output
    (entry,) = _manifest(broken)["runs"]
    assert entry["status"] == "pending" and entry["dir"] == _manifest(full)["runs"][0]["dir"]
    assert read_meta(latest_checkpoint(broken / entry["dir"]))["epoch"] == 1
    monkeypatch.setattr(Trainer, "_checkpoint", original)

    assert run("sweep", str(fast_recipe), "--out", str(broken), *args).exit_code == 0
    assert _manifest(broken)["runs"][0]["status"] == "done"
    a, b = _final_weights(full / entry["dir"]), _final_weights(broken / entry["dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "resum" in (broken / "logs" / f"{entry['dir']}.log").read_text()


def test_slurm_path_through_submitit_debug_executor(fast_recipe: Path, tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    out = tmp_path / "sweep"
    result = run("sweep", str(fast_recipe), "--seeds", "0", "--out", str(out), "--executor", "slurm",
                 "--cluster", "debug", "--time", "10", "--quiet")
    assert result.exit_code == 0, result.output
    (entry,) = _manifest(out)["runs"]
    assert entry["status"] == "done"
    assert list((out / entry["dir"] / "eval").glob("*/results.json"))  # the evaluation, kept per setting
    assert "submitted as job" in (out / "sweep.log").read_text()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_slurm_path_through_submitit_local_executor_requeues_on_preemption(fast_recipe: Path,
                                                                           tmp_path: Path) -> None:
    """submitit's LocalExecutor runs the job in its own process; a preemption signal after the first checkpoint
    requeues it (RunJob.checkpoint) and the requeued job resumes to the uninterrupted weights."""
    submitit = pytest.importorskip("submitit")
    from rsslctl.sweep.job import RunJob, subprocess_invoke
    args = ["--seeds", "1", "--set", "schedule.epochs=3", "--after", "none", "--quiet"]
    full = tmp_path / "full"
    assert run("sweep", str(fast_recipe), "--out", str(full), *args).exit_code == 0
    (entry,) = _manifest(full)["runs"]
    spec = SweepSpec(str(fast_recipe), seeds=[1], overrides=["schedule.epochs=3"], after=[])
    (planned,) = expand(spec)
    out = tmp_path / "local"
    job = RunJob(str(out), planned.dir, planned.name, str(fast_recipe), planned.sets, [], {}, subprocess_invoke)
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=30)
    (sj,) = executor.submit_array([job])
    import time
    deadline = time.time() + 300
    while latest_checkpoint(out / planned.dir) is None and time.time() < deadline:
        time.sleep(0.1)
    assert read_meta(latest_checkpoint(out / planned.dir))["epoch"] < 3, "finished before the preemption"
    # what Slurm does before a time limit or on preemption (--signal=USR2@…): signal every process of the job —
    # the job (checkpoint() → requeue) and the verb it runs
    import signal
    (task,) = _children(sj._process.pid)
    for pid in [task, *_children(task)]:
        os.kill(pid, signal.SIGUSR2)
    assert sj.result() == "done"
    assert "Requeued job" in sj.stdout() + (sj.stderr() or "")
    a, b = _final_weights(full / entry["dir"]), _final_weights(out / planned.dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_local_executor_end_to_end_and_parallel_jobs(fast_recipe: Path, tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    out = tmp_path / "local"
    result = run("sweep", str(fast_recipe), "--seeds", "0", "--out", str(out), "--executor", "slurm",
                 "--cluster", "local", "--quiet")
    assert result.exit_code == 0, result.output
    assert _manifest(out)["runs"][0]["status"] == "done"
    par = tmp_path / "parallel"
    result = run("sweep", str(fast_recipe), "--seeds", "0", "1", "--out", str(par), "--jobs", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in _manifest(par)["runs"]] == ["done", "done"]
    a = _final_weights(out / _manifest(out)["runs"][0]["dir"])
    b = _final_weights(par / _manifest(par)["runs"][0]["dir"])
    assert _manifest(out)["runs"][0]["dir"] == _manifest(par)["runs"][0]["dir"]
    assert a.keys() == b.keys()


def test_a_sweep_file_gives_the_same_runs_as_the_flags(tiny_recipe: Path, tmp_path: Path) -> None:
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(f'recipe = "{tiny_recipe.name}"\nseeds = [0, 1]\nset = ["optimizer.lr=0.07"]\n'
                          'after = ["evaluate", "finetune:slf"]\n[grid]\n"method.temperature" = [0.2, 0.5]\n'
                          '[options]\nfinetune = ["--epochs", "1"]\n')
    from rsslctl.run.sweep import load_spec
    spec = load_spec(sweep_file)
    assert spec.recipe == str(tiny_recipe) and spec.after == ["evaluate", "finetune:slf"]
    flags = SweepSpec(str(tiny_recipe), seeds=[0, 1], grid={"method.temperature": [0.2, 0.5]},
                      overrides=["optimizer.lr=0.07"])
    assert [r.dir for r in expand(spec)] == [r.dir for r in expand(flags)]
    out = tmp_path / "out"
    result = run("sweep", str(sweep_file), "--out", str(out), "--dry-run")
    assert result.exit_code == 0 and result.output.count("seed1-method.temperature=") == 2, result.output
    assert not out.exists()  # a dry run creates nothing
    result = run("sweep", str(sweep_file), "--out", str(out), "--dry-run", "--seeds", "4", "--grid",
                 "method.temperature=0.1")
    assert "seed4-method.temperature=0.1" in result.output and "seed0" not in result.output
    sweep_file.write_text('jobz = 2\n' + sweep_file.read_text())
    assert_user_error(run("sweep", str(sweep_file), "--out", str(out)), "unknown sweep key 'jobz'", "jobs")
    assert not out.exists()


def test_cluster_settings_become_the_sbatch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `--partition/--gpus-per-node/--nodes/--time/--jobs/--slurm-arg` ask of Slurm, as submitit writes it."""
    pytest.importorskip("submitit")
    from rsslctl.sweep.executors import SlurmOptions, make_executor
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{__import__('os').environ['PATH']}")
    options = SlurmOptions(partition="gpu", gpus_per_node=4, nodes=2, time_min=parse_time("12:00:00"),
                           cpus_per_task=8, extra={"account": "proj"})
    executor = make_executor(tmp_path / "submitit", options, 3, "rsslctl-sweep-x")
    script = executor._executor._make_submission_file_text("CMD", "UID")
    for line in ("--partition=gpu", "--gpus-per-node=4", "--nodes=2", "--ntasks-per-node=4", "--time=720",
                 "--cpus-per-task=8", "--account=proj", "--signal=USR2@"):
        assert f"#SBATCH {line}" in script, script
    assert executor._executor.parameters["array_parallelism"] == 3


@pytest.mark.slow
def test_a_multi_process_run_through_submitit_trains_distributed(fast_recipe: Path, tmp_path: Path) -> None:
    """Two tasks of one job join torch.distributed (gloo on the CPU) from submitit's environment; rank 0 then
    evaluates alone."""
    pytest.importorskip("submitit")
    out = tmp_path / "dist"
    result = run("sweep", str(fast_recipe), "--seeds", "0", "--out", str(out), "--executor", "slurm",
                 "--cluster", "local", "--tasks-per-node", "2", "--quiet")
    assert result.exit_code == 0, result.output
    (entry,) = _manifest(out)["runs"]
    assert entry["status"] == "done"
    assert read_meta(latest_checkpoint(out / entry["dir"]))["world_size"] == 2
    assert list((out / entry["dir"] / "eval").glob("*/results.json"))  # the evaluation, kept per setting
    assert (out / "logs" / f"{entry['dir']}.rank1.log").is_file()


def test_parallel_local_jobs_share_the_cpu_threads(tiny_recipe: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs N: at most N runs at once, each verb a process limited to cores / N threads."""
    import threading
    import time

    from rsslctl.sweep import executors
    calls: list[tuple[str, int]] = []
    active, peak, lock = [0], [0], threading.Lock()

    def fake_invoke(argv: list[str], log, threads: int) -> int:
        with lock:
            calls.append((argv[0], threads))
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return 0

    monkeypatch.setattr(executors, "subprocess_invoke", fake_invoke)
    monkeypatch.setattr(executors, "cpu_threads", lambda: 8)
    out = tmp_path / "sweep"
    result = run("sweep", str(tiny_recipe), "--seeds", "0", "1", "2", "3", "--out", str(out), "--jobs", "2",
                 "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(calls) == [("evaluate", 4)] * 4 + [("pretrain", 4)] * 4
    assert peak[0] == 2
    assert [r["status"] for r in _manifest(out)["runs"]] == ["done"] * 4


def test_a_run_another_process_is_writing_is_left_alone(tiny_recipe: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import rsslctl.cli.sweep as verb
    from rsslctl.run.directory import RunLock
    calls: list[list[str]] = []
    monkeypatch.setattr(verb, "invoke_inprocess", lambda argv, log, threads: calls.append(argv) or 0)
    out = tmp_path / "sweep"
    args = ["--seeds", "0", "1", "--out", str(out), "--quiet", "--after", "none"]
    assert run("sweep", str(tiny_recipe), *args).exit_code == 0
    assert len(calls) == 2
    first, second = (r["dir"] for r in _manifest(out)["runs"])
    for name in (first, second):
        (out / ".state" / f"{name}.json").unlink()  # as if neither had finished
    calls.clear()
    with RunLock(out / first, "pretraining"):  # another process is training the first run
        assert run("sweep", str(tiny_recipe), *args).exit_code == 0
    assert calls == [["pretrain", str(tiny_recipe.resolve()), "--run-dir", str((out / second).resolve()), "--quiet",
                      "--set", "run.seed=1"]]
