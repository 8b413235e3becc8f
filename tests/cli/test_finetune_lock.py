"""Two fine-tunings into one output directory cannot collide: the second is refused in one line naming the process
that holds ``<out>/finetune``; both sides are real ``rsslctl`` processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RSSLCTL = Path(sys.executable).with_name("rsslctl")
#: holds the lock with the same helper finetune uses, until stdin closes (the lock object must stay referenced)
HOLD = """
import sys
from rsslctl.run.directory import RunLock
lock = RunLock(sys.argv[1], "fine-tuning").acquire()
print("held", flush=True)
sys.stdin.read()
lock.release()
"""
FAST = ["--mode", "SLF", "--batch-size", "32", "--test-limit", "32", "--set", "data.limit=64", "--quiet",
        "--no-evaluate"]


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _one_line_refusal(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in proc.stdout + proc.stderr, err
    for fragment in fragments:
        assert fragment in err, err


def test_a_finetune_is_refused_while_another_process_holds_the_lock(pretrained_run: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(pretrained_run / "finetune")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _files(pretrained_run)
        second = subprocess.run([str(RSSLCTL), "finetune", str(pretrained_run), "--epochs", "1", *FAST],
                                capture_output=True, text=True, timeout=120)
        _one_line_refusal(second, "in use by", f"process {holder.pid}", "fine-tuning")
        assert _files(pretrained_run) == before  # nothing written or removed
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.slow  # three real processes and a pretrained run's fine-tuning start-up
def test_two_real_finetunes_the_second_is_refused_naming_the_first(pretrained_run: Path) -> None:
    # runs after the test above: that the first takes the lock also shows the holder's lock was released
    lock = pretrained_run / "finetune" / ".rsslctl.lock"
    first = subprocess.Popen([str(RSSLCTL), "finetune", str(pretrained_run), "--epochs", "100000", *FAST],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and f"process {first.pid}" in lock.read_text()):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first finetune never took the lock"
            time.sleep(0.2)
        second = subprocess.run([str(RSSLCTL), "finetune", str(pretrained_run), "--epochs", "1", *FAST],
                                capture_output=True, text=True, timeout=120)
        _one_line_refusal(second, "in use by", f"rsslctl process {first.pid} (fine-tuning)")
        assert first.poll() is None  # the first goes on undisturbed
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM, err
    assert not (pretrained_run / "finetune" / "SLF").exists()  # the interrupted mode left nothing behind
    assert not list((pretrained_run / "finetune").glob(".SLF.tmp-*"))
    assert os.path.isfile(lock)  # the lock file stays (it is what keeps writers apart); the lock itself is gone
