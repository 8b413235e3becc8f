"""Ctrl-C from a real terminal (a tmux pane): one line, exit code 130, no temporary file, earlier results intact.
Skipped where tmux is not installed."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
RSSLCTL = Path(sys.executable).with_name("rsslctl")
#: CPU seconds the command has spent before Ctrl-C: past the imports, inside the verb's own work
BUSY_CPU_S = 6.0
#: printed by the pane's shell after the command and its exit code
FINISHED = "rsslctl-test-finished"


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True, timeout=30).stdout


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def interrupt_in_tmux(args: list[str], tmp_path: Path, timeout: float = 240) -> tuple[int, str]:
    """Run ``rsslctl ARGS`` in a fresh tmux pane, press Ctrl-C once it is busy; (exit code, pane text)."""
    session = f"rsslctl-test-{os.getpid()}-{time.monotonic_ns()}"
    rc_file = tmp_path / "rc"
    # the marker is typed split in two, so only the shell's output of it (not the echo of the typed line) matches
    marker = f"{FINISHED[:4]}''{FINISHED[4:]}"
    line = f"{shlex.join([str(RSSLCTL), *args])}; echo $? > {shlex.quote(str(rc_file))}; echo {marker}"
    _tmux("new-session", "-d", "-s", session, "-x", "220", "-y", "60", "bash --norc --noprofile")
    try:
        shell = int(_tmux("display-message", "-p", "-t", session, "#{pane_pid}").strip())
        _tmux("send-keys", "-t", session, line, "Enter")
        deadline = time.monotonic() + timeout
        pid = None
        while True:
            assert time.monotonic() < deadline, "the command never got busy"
            assert not rc_file.exists(), "the command ended before it was interrupted"
            if pid is None:
                kids = subprocess.run(["pgrep", "-P", str(shell)], capture_output=True, text=True).stdout.split()
                pid = int(kids[0]) if kids else None
            elif _cpu_seconds(pid) >= BUSY_CPU_S:
                break
            time.sleep(0.2)
        _tmux("send-keys", "-t", session, "C-c")
        while not (rc_file.exists() and rc_file.read_text().strip()):
            assert time.monotonic() < deadline, "the command did not stop after Ctrl-C"
            time.sleep(0.2)
        # the rc file can exist before the tmux server has drawn the command's last output: wait for the marker,
        # printed after it, so the pane holds everything the command wrote
        while FINISHED not in (pane := _tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", session)).splitlines():
            assert time.monotonic() < deadline, f"the pane never showed the end of the command:\n{pane}"
            time.sleep(0.2)
        return int(rc_file.read_text()), pane.rstrip()
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=30)


def assert_one_interrupt_line(rc: int, pane: str) -> None:
    assert rc == 130, pane
    assert "Traceback" not in pane and "Aborted" not in pane, pane
    lines = [ln.removeprefix("^C") for ln in pane.splitlines() if "interrupted" in ln]  # ^C: the terminal's echo
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGINT)"), pane
    assert "kept earlier results" in lines[0], lines[0]


def temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp" in p.name]


def test_ctrl_c_during_evaluate(pretrained_run: Path, tmp_path: Path) -> None:
    (pretrained_run / "embedding.png").write_bytes(b"earlier plot")
    before = sorted(pretrained_run.rglob("results.json"))
    rc, pane = interrupt_in_tmux(["evaluate", str(pretrained_run), "--force", "--plot-embedding",
                                  "--set", "evaluation.epochs=100000"], tmp_path)
    assert_one_interrupt_line(rc, pane)
    assert sorted(pretrained_run.rglob("results.json")) == before  # the interrupted evaluation stored nothing
    assert (pretrained_run / "embedding.png").read_bytes() == b"earlier plot" and not temporaries(pretrained_run)


def test_ctrl_c_during_finetune(pretrained_run: Path, tmp_path: Path) -> None:
    earlier = pretrained_run / "finetune" / "SLF"
    earlier.mkdir(parents=True, exist_ok=True)
    (earlier / "config.json").write_text('{"earlier": true}')
    rc, pane = interrupt_in_tmux(["finetune", str(pretrained_run), "--mode", "SLF", "--force", "--epochs", "100000",
                                  "--batch-size", "32", "--set", "data.limit=64", "--no-evaluate"], tmp_path)
    assert_one_interrupt_line(rc, pane)
    assert (earlier / "config.json").read_text() == '{"earlier": true}' and not temporaries(pretrained_run)


def test_ctrl_c_during_select_coreset(pretrained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "coreset.json"
    out.write_text('{"earlier": true}')
    rc, pane = interrupt_in_tmux(["select-coreset", "--run-dir", str(pretrained_run), "--fraction", "0.5",
                                  "--out", str(out), "--force", "--set", "data.limit=0", "--set", "coreset.name='rcs'",
                                  "--set", "schedule.batch_size=8"], tmp_path)
    assert_one_interrupt_line(rc, pane)
    assert out.read_text() == '{"earlier": true}' and not temporaries(tmp_path)


def test_ctrl_c_while_starting_up(pretrained_run: Path, tmp_path: Path) -> None:
    """Pressed while torch and the plugins are still being imported (the command's first CPU second): the CLI
    itself starts without torch, so this is the verb importing it."""
    global BUSY_CPU_S
    busy, BUSY_CPU_S = BUSY_CPU_S, 0.3
    try:
        rc, pane = interrupt_in_tmux(["evaluate", str(pretrained_run), "--force"], tmp_path)
    finally:
        BUSY_CPU_S = busy
    assert rc == 130 and "Traceback" not in pane, pane
    assert len([ln for ln in pane.splitlines() if "interrupted (SIGINT)" in ln]) == 1, pane
