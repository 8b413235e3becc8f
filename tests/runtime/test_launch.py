"""`rsslctl VERB --nproc-per-node N` (torch's elastic launcher) and the guards every multi-process run has: the
recipe checked once before any rank starts, a failure on any rank shown as that rank's one line (exit code 2), ranks
that disagree on the recipe or seed stopped at once, and bounded waits for peers. Real processes on gloo (CPU),
world size 2, every subprocess with a timeout."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_user_error, run
from safetensors.torch import load_file

from rsslctl.runtime import launch
from rsslctl.runtime.checkpoint import latest_checkpoint

TIMEOUT = 240  # seconds: a hang fails the test instead of blocking pytest
SMALL = ["engine.threads=1", "engine.precision='fp32'", "engine.channels_last=false", "schedule.epochs=1",
         "data.limit=32", "schedule.batch_size=16"]


def sets(*overrides: str) -> list[str]:
    return [x for s in overrides for x in ("--set", s)]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rsslctl.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300", **extra}


def torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    return env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def ranks(per_rank: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Each ``per_rank[r]`` as rank r, with torchrun's environment (the existing torchrun path)."""
    port = free_port()
    procs = [subprocess.Popen(args, env=torchrun_env(r, len(per_rank), port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r, args in enumerate(per_rank)]
    try:
        return [subprocess.CompletedProcess(p.args, p.wait(TIMEOUT), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


# -- checked in the parent -----------------------------------------------------------------------------------------
def test_bad_global_batch_is_refused_before_any_rank_starts(tiny_recipe: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    started = []
    monkeypatch.setattr(launch, "launch", lambda *a: started.append(a))
    result = run("pretrain", str(tiny_recipe), "--run-dir", str(tmp_path / "r"), "--nproc-per-node", "2",
                 "--set", "schedule.batch_size=31")
    assert_user_error(result, "schedule.batch_size = 31", "multiple of 2")
    assert not started and not (tmp_path / "r").exists()


def test_resuming_with_another_number_of_ranks_is_refused_before_any_starts(tiny_recipe: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from rsslctl.run.directory import prepare_run_dir
    from rsslctl.run.recipe import load
    started = []
    monkeypatch.setattr(launch, "launch", lambda *a: started.append(a))
    run_dir = tmp_path / "r"
    prepare_run_dir(load(tiny_recipe), run_dir, False)
    (run_dir / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (run_dir / "checkpoints" / "epoch-0001" / "meta.json").write_text('{"epoch": 1, "sha256": {}, "world_size": 1}')
    result = run("pretrain", "--resume", str(run_dir), "--nproc-per-node", "2")
    assert_user_error(result, "written by a run of 1 process(es), resumed with 2")
    assert not started


def test_finetune_and_selection_check_data_and_encoder_before_any_rank_starts(
        pretrained_run: Path, tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = []
    monkeypatch.setattr(launch, "launch", lambda *a: started.append(a))
    missing = tmp_path / "no-data"
    result = run("finetune", str(pretrained_run), "--mode", "SLF", "--out", str(tmp_path / "ft"), "--data", "cifar10",
                 "--data-root", str(missing), "--nproc-per-node", "2")
    assert_user_error(result, str(missing))
    unpretrained = tmp_path / "fresh"
    from rsslctl.run.directory import prepare_run_dir
    from rsslctl.run.recipe import load
    prepare_run_dir(load(tiny_recipe), unpretrained, False)
    result = run("select-coreset", "--run-dir", str(unpretrained), "--fraction", "0.5", "--out",
                 str(tmp_path / "c.json"), "--nproc-per-node", "2")
    assert_user_error(result, "no checkpoint yet")
    result = run("select-coreset", str(tiny_recipe), "--fraction", "0.5", "--out", str(tmp_path / "c.json"),
                 "--nproc-per-node", "2", "--set", "data.name='cifar10'", "--set", f"data.root='{missing}'")
    assert_user_error(result, str(missing))
    assert not started and not (tmp_path / "ft").exists() and not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--rdzv-endpoint", "host:99999", "--nnodes", "2"], "'99999' is not a TCP port"),
    (["--rdzv-endpoint", "host:x", "--nnodes", "2"], "'x' is not a TCP port"),
    (["--nnodes", "2"], "pass --rdzv-endpoint"),
    (["--node-rank", "2", "--nnodes", "2", "--rdzv-endpoint", "h:1"], "--node-rank 2"),
])
def test_bad_launch_options_are_one_line(tiny_recipe: Path, tmp_path: Path, flags: list[str], fragment: str) -> None:
    result = run("pretrain", str(tiny_recipe), "--run-dir", str(tmp_path / "r"), "--nproc-per-node", "2", *flags)
    assert_user_error(result, fragment)


def test_failures_are_one_line_per_distinct_error(tmp_path: Path) -> None:
    """The parent's view of the ranks' records: primaries first, echoes only when nothing else, ranks named."""
    def write(rank: int, text: str, secondary: bool = False, code: int = 2) -> None:
        path = tmp_path / str(rank) / "error.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"message": text, "timestamp": 0, "rsslctl": {
            "rank": rank, "text": text, "exit_code": code, "secondary": secondary}}))
    write(0, "lost the other ranks", secondary=True, code=1)
    assert launch.failure(tmp_path, {}).lines == ["rank 0: lost the other ranks"]
    write(1, "data missing")
    write(2, "data missing")
    write(3, "bad key")
    out = launch.failure(tmp_path, {})
    assert out.lines == ["ranks 1, 2: data missing", "rank 3: bad key"] and out.exit_code == 2
    assert launch.failure(tmp_path / "none", {1: -9}).lines[0].startswith("rank 1: killed by SIGKILL")


def test_nproc_per_node_under_torchrun_is_refused(tiny_recipe: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in torchrun_env(0, 2, 29500).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(launch.CHILD_ENV, raising=False)
    result = run("pretrain", str(tiny_recipe), "--run-dir", str(tmp_path / "r"), "--nproc-per-node", "2")
    assert_user_error(result, "--nproc-per-node under torchrun would start processes twice")


# -- the ranks -----------------------------------------------------------------------------------------------------
HOOK = '''
import os
if os.environ.get("RANK") == "1":  # the training data is missing on rank 1 only
    import rsslctl.train.engine as engine
    from rsslctl.base.errors import DataMissing

    def missing(*args, **kwargs):
        raise DataMissing("digits: data files not found: looked for /rank1/data; copy the data to this machine")
    engine.open_train_split = missing
'''


def test_an_error_on_rank_1_only_is_shown_as_its_line(tiny_recipe: Path, tmp_path: Path) -> None:
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(HOOK)  # imported by every process started below
    out = subprocess.run(cli("pretrain", str(tiny_recipe), "--run-dir", str(tmp_path / "r"), "--quiet",
                             "--nproc-per-node", "2", *sets(*SMALL)), capture_output=True, text=True,
                         timeout=TIMEOUT, env=env(PYTHONPATH=str(tmp_path / "hook")))
    assert out.returncode == 2, out.stderr[-3000:]
    line = one_line(out.stderr)
    assert line.startswith("error: rank 1: digits: data files not found: looked for /rank1/data"), line


@pytest.mark.parametrize("key, value", [("run.seed", "4"),
                                        pytest.param("schedule.epochs", "2", marks=pytest.mark.slow)])
def test_ranks_with_different_recipes_stop_with_one_line(tiny_recipe: Path, tmp_path: Path, key: str,
                                                         value: str) -> None:
    base = cli("pretrain", str(tiny_recipe), "--run-dir", str(tmp_path / "r"), "--quiet", *sets(*SMALL))
    runs = ranks([base, [*base, "--set", f"{key}={value}"]])
    assert [r.returncode for r in runs] == [2, 2], runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    line = one_line(runs[0].stderr)  # rank 0 prints for everyone
    assert f"rank 1 runs another recipe than rank 0: {key} = {value} there" in line, line
    assert runs[1].stderr.strip() == "" and not (tmp_path / "r").exists()


def test_a_rank_without_peers_stops_within_the_join_timeout(tiny_recipe: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    out = subprocess.run(cli("pretrain", str(tiny_recipe), "--run-dir", str(tmp_path / "r"), "--quiet",
                             *sets(*SMALL, "engine.join_timeout_s=2")), capture_output=True, text=True,
                         timeout=TIMEOUT, env=torchrun_env(0, 2, free_port()))
    assert out.returncode == 2, out.stderr
    line = one_line(out.stderr)
    assert "rank 0 of 2: the other ranks did not join" in line and "within 2 s" in line, line
    assert "--nproc-per-node 2" in line and time.monotonic() - t0 < 120  # start-up plus the 2 s, not an hour


@pytest.mark.parametrize("port", ["70000", "http"])
def test_a_bad_master_port_is_one_line(tiny_recipe: Path, tmp_path: Path, port: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in torchrun_env(0, 2, 0).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", port)
    result = run("pretrain", str(tiny_recipe), "--run-dir", str(tmp_path / "r"), "--quiet")
    assert_user_error(result, f"MASTER_PORT: {port!r} is not a TCP port", "between 1 and 65535")


@pytest.mark.slow  # two two-process runs: about a minute on two loaded cores
def test_nproc_per_node_trains_what_the_torchrun_path_trains(tiny_recipe: Path, tmp_path: Path) -> None:
    """`rsslctl pretrain --nproc-per-node 2` and two ranks started with torchrun's environment: the same weights,
    optimizer and per-rank random states, bit for bit, and the same records."""
    args = ["pretrain", str(tiny_recipe), "--quiet", *sets(*SMALL)]
    out = subprocess.run(cli(*args, "--run-dir", str(tmp_path / "a"), "--nproc-per-node", "2"), capture_output=True,
                         text=True, timeout=TIMEOUT, env=env())
    assert out.returncode == 0, out.stderr[-3000:]
    runs = ranks([cli(*args, "--run-dir", str(tmp_path / "b"))] * 2)
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert a.name == b.name and json.loads((a / "meta.json").read_text())["world_size"] == 2
    for name in ("model.safetensors", "state.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}: {k}"
    assert "rank1.rng.cpu" in load_file(a / "state.safetensors")
    def strip(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert strip(tmp_path / "a") == strip(tmp_path / "b")


@pytest.mark.slow  # waits for the ranks' first checkpoint
def test_an_interrupted_launch_stops_every_rank_with_one_line(tiny_recipe: Path, tmp_path: Path) -> None:
    import signal
    run_dir = tmp_path / "r"
    p = subprocess.Popen(cli("pretrain", str(tiny_recipe), "--run-dir", str(run_dir), "--quiet", "--nproc-per-node",
                             "2", *sets(*SMALL, "schedule.epochs=500")),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while latest_checkpoint(run_dir) is None and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGINT)"), err[-2000:]


def test_two_machines_meeting_at_a_rendezvous_train_what_one_machine_trains(tiny_recipe: Path, tmp_path: Path) -> None:
    """`--nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT`, one process per "machine" (two launchers on this one,
    sharing the run directory as a cluster's shared file system does): the same weights as `--nproc-per-node 2`."""
    args = ["pretrain", str(tiny_recipe), "--quiet", *sets(*SMALL)]
    port = str(free_port())
    nodes = [subprocess.Popen(cli(*args, "--run-dir", str(tmp_path / "nodes"), "--nproc-per-node", "1", "--nnodes",
                                  "2", "--node-rank", str(r), "--rdzv-endpoint", f"127.0.0.1:{port}"),
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        done = [(p.wait(TIMEOUT), p.communicate()[1]) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert [rc for rc, _ in done] == [0, 0], done
    one = subprocess.run(cli(*args, "--run-dir", str(tmp_path / "one"), "--nproc-per-node", "2"), capture_output=True,
                         text=True, timeout=TIMEOUT, env=env())
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = latest_checkpoint(tmp_path / "nodes"), latest_checkpoint(tmp_path / "one")
    assert a.name == b.name and json.loads((a / "meta.json").read_text())["world_size"] == 2
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
