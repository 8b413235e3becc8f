"""Data loss, concurrency, divergence and crash hygiene: the cases of the hostile/careless-user report, each run for
real on the tiny recipe (1 epoch of 64 digits at 16 px)."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_user_error as one_line
from cli_helpers import run
from safetensors.torch import load_file, save_file

from rsslctl.run.directory import LOCK_FILE, MARKER, RunLock
from rsslctl.runtime.checkpoint import sha256

FAST = ["--quiet", "--set", "schedule.epochs=1", "--set", "data.limit=64", "--set", "schedule.batch_size=32"]


@pytest.fixture(scope="module")
def _trained_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import TINY
    base = tmp_path_factory.mktemp("trained")
    recipe = base / "tiny.toml"
    recipe.write_text(TINY)
    run_dir = base / "done"
    result = run("pretrain", str(recipe), "--run-dir", str(run_dir), *FAST, "--set", "schedule.epochs=2",
                 "--set", "schedule.warmup_epochs=0")
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture
def trained(_trained_once: Path, tmp_path: Path) -> Path:
    """A finished 2-epoch run keeping both checkpoints (trained once per module, copied for each test)."""
    import shutil
    run_dir = tmp_path / "runs" / "done"
    shutil.copytree(_trained_once, run_dir)
    return run_dir


# -- data loss ------------------------------------------------------------------------------------------------------
def test_force_never_deletes_a_directory_that_is_not_a_run(tiny_recipe: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("four years")
    one_line(run("pretrain", str(tiny_recipe), "--run-dir", str(victim), "--force", *FAST), "not an rsslctl run")
    assert (victim / "thesis.tex").read_text() == "four years"


def test_force_never_replaces_the_output_dir_or_escapes_it(tiny_recipe: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    sibling = runs / "sibling"
    sibling.mkdir(parents=True)
    (sibling / "keep.txt").write_text("x")
    one_line(run("pretrain", str(tiny_recipe), "--force", "--set", "run.name='.'", *FAST), "not a valid run name")
    one_line(run("pretrain", str(tiny_recipe), "--run-dir", str(runs), "--force", *FAST), "refusing to replace")
    one_line(run("pretrain", str(tiny_recipe), "--force", "--set", "run.name='../escaped'", *FAST), "run name")
    assert (sibling / "keep.txt").is_file() and not (tmp_path / "escaped").exists()


def test_force_replaces_a_run_and_writes_the_marker(trained: Path, tiny_recipe: Path) -> None:
    assert (trained / MARKER).is_file()
    (trained / "metrics.jsonl").write_text("")
    result = run("pretrain", str(tiny_recipe), "--run-dir", str(trained), "--force", *FAST)
    assert result.exit_code == 0, result.output
    assert [p.name for p in (trained / "checkpoints").iterdir()] == ["epoch-0001"]


def test_export_never_overwrites_what_it_reads_and_needs_force(trained: Path) -> None:
    metrics = (trained / "metrics.jsonl").read_bytes()
    one_line(run("export", str(trained), "--out", str(trained / "metrics.jsonl")), ".safetensors")
    one_line(run("export", str(trained), "--out", str(trained / "checkpoints" / "x.safetensors")), "reads")
    assert (trained / "metrics.jsonl").read_bytes() == metrics
    assert run("export", str(trained)).exit_code == 0
    one_line(run("export", str(trained)), "already exists", "--force")
    assert run("export", str(trained), "--force").exit_code == 0


def test_select_coreset_out_cannot_be_the_runs_recipe(trained: Path) -> None:
    recipe = (trained / "recipe.toml").read_bytes()
    one_line(run("select-coreset", "--run-dir", str(trained), "--fraction", "0.5", "--out",
                 str(trained / "checkpoints" / "c.json"), "--force"), "reads")
    assert (trained / "recipe.toml").read_bytes() == recipe


# -- the lock --------------------------------------------------------------------------------------------------------
HOLD = """
import sys, time
from rsslctl.run.directory import RunLock
lock = RunLock(sys.argv[1], "the test's other writer").acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_two_writers_cannot_share_a_run(trained: Path, tiny_recipe: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(trained)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        before = sorted(p.name for p in trained.rglob("*"))
        one_line(run("pretrain", "--resume", str(trained), "--quiet"), "in use by", "the test's other writer")
        one_line(run("pretrain", str(tiny_recipe), "--run-dir", str(trained), "--force", *FAST), "in use by")
        assert sorted(p.name for p in trained.rglob("*")) == before  # nothing deleted or interleaved
    finally:
        other.kill()
        other.wait()
    with RunLock(trained):  # released by the kernel when the holder died
        pass
    assert (trained / LOCK_FILE).is_file()


def test_readers_follow_a_writer_that_prunes(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rsslctl.runtime.checkpoint as ckpt_mod
    real = ckpt_mod.load_checkpoint
    calls = []

    def racing(ckpt: Path, verify: bool = True):  # the writer prunes the checkpoint the reader picked
        calls.append(ckpt.name)
        if len(calls) == 1:
            raise FileNotFoundError(ckpt / "model.safetensors")
        return real(ckpt, verify)
    monkeypatch.setattr(ckpt_mod, "load_checkpoint", racing)
    found = ckpt_mod.load_latest(trained)
    assert found is not None and found[0].name == "epoch-0002" and calls == ["epoch-0002", "epoch-0002"]


# -- divergence ----------------------------------------------------------------------------------------------------
def test_weights_that_diverge_after_a_finite_loss_never_become_a_checkpoint(tiny_recipe: Path, tmp_path: Path) -> None:
    from rsslctl.base.errors import TrainingDiverged
    from rsslctl.run.directory import prepare_run_dir
    from rsslctl.run.recipe import load
    from rsslctl.train.engine import Trainer
    recipe = load(tiny_recipe, ["schedule.epochs=2", "data.limit=64", "schedule.batch_size=32", "engine.log_every=1"])
    run_dir = prepare_run_dir(recipe, tmp_path / "div", force=False)
    trainer = Trainer(recipe, run_dir, quiet=True)

    def poison(step: int) -> None:
        if step == 2:  # the first step of epoch 2: its loss was computed before the weights went bad
            with torch.no_grad():
                next(trainer.method.parameters()).fill_(float("nan"))
    trainer.on_step = poison
    with pytest.raises(TrainingDiverged, match="weights became non-finite"):
        trainer.fit()
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["epoch-0001"]
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpts[0] / "model.safetensors")).values()
               if t.is_floating_point())


def _poison_checkpoint(ckpt: Path) -> None:
    state = load_file(str(ckpt / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(ckpt / "model.safetensors"))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"]["model.safetensors"] = sha256(ckpt / "model.safetensors")
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_commands_refuse_non_finite_weights(trained: Path, tmp_path: Path) -> None:
    _poison_checkpoint(trained / "checkpoints" / "epoch-0002")
    one_line(run("evaluate", str(trained)), "NaN or inf")
    one_line(run("export", str(trained)), "NaN or inf")
    one_line(run("finetune", str(trained), "--epochs", "1", "--no-evaluate"), "NaN or inf")
    assert not (trained / "eval").exists() and not (trained / "encoder.safetensors").exists()


# -- crash hygiene --------------------------------------------------------------------------------------------------
def test_resume_of_a_finished_run_says_so(trained: Path) -> None:
    result = run("pretrain", "--resume", str(trained), "--quiet")
    assert result.exit_code == 0 and "already finished all 2 epochs" in result.stderr


def test_resume_without_checkpoints_says_so_and_drops_stale_records(trained: Path) -> None:
    import shutil
    shutil.rmtree(trained / "checkpoints")
    (trained / "checkpoints").mkdir()
    stale = trained / "checkpoints" / ".tmp-epoch-0003-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with open(trained / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "step", "epoch": 1, "st')  # partial last line of a killed run
    result = run("pretrain", "--resume", str(trained), "--quiet")
    assert result.exit_code == 0, result.output
    assert "no checkpoint yet" in result.stderr and not stale.exists()
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == sorted(set(steps))  # each step once, no duplicates from the killed attempt


def test_resume_refuses_a_metrics_log_linked_to_a_device(trained: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    (trained / "metrics.jsonl").unlink()
    (trained / "metrics.jsonl").symlink_to("/dev/full")  # read back whole, it would never end
    one_line(run("pretrain", "--resume", str(trained), "--quiet"), "metrics.jsonl: not a regular file")
    assert os.readlink(trained / "metrics.jsonl") == "/dev/full"


def test_corrupt_newest_checkpoint_offers_the_previous_one(trained: Path) -> None:
    newest = trained / "checkpoints" / "epoch-0002"
    (newest / "model.safetensors").write_bytes(b"\x00" * 16)
    err = one_line(run("pretrain", "--resume", str(trained), "--quiet"), "epoch-0002", "corrupt",
                   "--from-checkpoint", "epoch-0001", "nothing was deleted")
    assert newest.is_dir() and "checksum" in err
    result = run("pretrain", "--resume", str(trained), "--quiet", "--from-checkpoint",
                 str(trained / "checkpoints" / "epoch-0001"))
    assert result.exit_code == 0, result.output
    assert load_file(str(newest / "model.safetensors"))  # epoch 2 trained again and saved whole


@pytest.mark.parametrize("damage, fragment", [
    (lambda c: (c / "meta.json").write_text('{"epoch": 2, "sha'), "meta.json unreadable"),
    (lambda c: (c / "meta.json").write_text(""), "meta.json unreadable"),
    (lambda c: (c / "meta.json").write_text("{}"), "meta.json lacks"),
    (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda c: (c / "state.safetensors").write_bytes(b"\xff" * 64), "checksum mismatch"),
])
def test_damaged_checkpoints_are_one_line_for_every_reader(trained: Path, damage, fragment: str) -> None:
    damage(trained / "checkpoints" / "epoch-0002")
    one_line(run("pretrain", "--resume", str(trained), "--quiet"), fragment)
    one_line(run("evaluate", str(trained)), fragment)
    one_line(run("export", str(trained)), fragment)


def test_malformed_safetensors_header_with_matching_checksum(trained: Path) -> None:
    ckpt = trained / "checkpoints" / "epoch-0002"
    (ckpt / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"]["model.safetensors"] = sha256(ckpt / "model.safetensors")
    (ckpt / "meta.json").write_text(json.dumps(meta))
    one_line(run("evaluate", str(trained)), "corrupt checkpoint")


def test_wrong_tensor_shapes_are_one_line(trained: Path) -> None:
    recipe = (trained / "recipe.toml").read_text().replace("channels = [8, 16, 16, 16]", "channels = [8, 16, 16, 32]")
    (trained / "recipe.toml").write_text(recipe)
    one_line(run("evaluate", str(trained)), "does not match the recipe's model")
    one_line(run("pretrain", "--resume", str(trained), "--quiet"), "does not match the recipe's model")


def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_nothing(tiny_recipe: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import rsslctl.runtime.checkpoint as ckpt_mod
    real = ckpt_mod.save_file

    def full(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(ckpt_mod, "save_file", full)
    run_dir = tmp_path / "full"
    one_line(run("pretrain", str(tiny_recipe), "--run-dir", str(run_dir), *FAST), "No space left on device",
             "free disk space")
    assert list((run_dir / "checkpoints").iterdir()) == []  # no temporary or partial checkpoint left


RLIMIT_RUN = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from rsslctl.cli import main
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = ["rsslctl"] + sys.argv[2:]
main()
"""


def test_file_size_limit_during_a_real_checkpoint(tiny_recipe: Path, tmp_path: Path) -> None:
    """A real write failure (RLIMIT_FSIZE: writes past 64 KiB fail with EFBIG), in a separate process."""
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "RLIMIT_FSIZE") or not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no file-size limit on this platform")
    run_dir = tmp_path / "limited"
    proc = subprocess.run([sys.executable, "-c", RLIMIT_RUN, str(64 * 1024), "pretrain", str(tiny_recipe),
                           "--run-dir", str(run_dir), *FAST], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "File too large" in err, err
    assert list((run_dir / "checkpoints").iterdir()) == []


def test_sigterm_is_handled_like_sigint(tiny_recipe: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "rsslctl.cli", "pretrain", str(tiny_recipe), "--run-dir",
                             str(run_dir), "--quiet", "--set", "schedule.epochs=500", "--set", "data.limit=64",
                             "--set", "schedule.batch_size=32"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "epoch-0001").is_dir() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM)" in err and "--resume" in err and "Traceback" not in err
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_plugin_verbs_force_never_deletes_a_directory_that_is_not_a_run(trained: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("four years")
    one_line(run("dynacl-pp", str(trained), "--out", str(victim), "--force"), "not an rsslctl run")
    one_line(run("dynacl-pp", str(trained), "--out", str(trained.parent), "--force"), "refusing to replace")
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"not read")
    one_line(run("import", str(fake), "--out", str(victim), "--force"), "not an rsslctl run")
    assert (victim / "thesis.tex").read_text() == "four years" and (trained / "recipe.toml").is_file()
