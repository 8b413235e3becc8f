"""One run of a sweep as a job: pretrain (or resume it), then the steps after it, each an rsslctl verb.

A job keeps its progress in ``<sweep>/.state/<dir>.json`` (written atomically, by the job itself, so a cluster job
reports even when the process that submitted it is gone) and the output of its verbs in ``<sweep>/logs/<dir>.log``.
It is picklable (submitit sends it to the cluster) and, being the same call again, requeues itself on preemption
or timeout: every step resumes from what is on disk (``pretrain --resume`` from the last checkpoint).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from rsslctl.base.files import atomic_write_text
from rsslctl.run.directory import LOCK_FILE, MARKER, is_run_dir

STATE_DIR = ".state"
LOG_DIR = "logs"
#: exit codes of a verb stopped by SIGINT / SIGTERM (128 + signal): the sweep stops too, the run stays resumable
INTERRUPTED = (130, 143)
#: runs a verb: (command-line arguments after ``rsslctl``, log file, CPU threads or 0) → exit code
Invoke = Callable[[list[str], TextIO, int], int]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_invoke(argv: list[str], log: TextIO, threads: int) -> int:
    """A verb in its own Python process, its torch limited to ``threads`` CPU threads (0 = torch's default)."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, "-m", "rsslctl.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env)
    try:
        code = proc.wait()
        if code == -signal.SIGUSR2:  # Slurm signals the whole job: give submitit's handler in this process
            time.sleep(10)           # (checkpoint and requeue) the time to act before calling the run failed
        return code
    except BaseException:  # the sweep is interrupted: stop the child the same way (it keeps its checkpoints)
        proc.terminate()
        proc.wait()
        raise


def read_state(sweep_dir: Path, run: str) -> dict[str, Any]:
    try:
        data = json.loads((Path(sweep_dir) / STATE_DIR / f"{run}.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lock_held(run_dir: Path) -> bool:
    """True while a process holds the run directory's lock (an rsslctl verb writing it)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False


def run_status(sweep_dir: Path, run: str) -> str:
    """done | running | failed | pending of one run, from its state file and its lock."""
    state = read_state(sweep_dir, run).get("status")
    if state == "done":
        return "done"
    if lock_held(Path(sweep_dir) / run) or (state == "running" and _owner_alive(sweep_dir, run)):
        return "running"
    return "failed" if state == "failed" else "pending"


def _owner_alive(sweep_dir: Path, run: str) -> bool:
    """A job of this machine marked running is still running while its process lives (between two verbs no lock
    is held)."""
    state = read_state(sweep_dir, run)
    if state.get("host") != os.uname().nodename:
        return False
    try:
        os.kill(int(state.get("pid", 0)), 0)
    except (OSError, ValueError):
        return False
    return int(state.get("pid", 0)) > 0


@dataclasses.dataclass
class RunJob:
    """Pretrain one run of a sweep and run its steps after pretraining; returns ``done`` or ``failed``."""

    sweep_dir: str
    dir: str
    name: str
    recipe: str
    sets: list[str]
    after: list[str]
    options: dict[str, list[str]]
    invoke: Invoke
    threads: int = 0
    distributed: bool = False  # a multi-process (multi-node) cluster job: join torch.distributed through submitit

    @property
    def run_dir(self) -> Path:
        return Path(self.sweep_dir) / self.dir

    def _argv(self, step: str) -> list[str]:
        run_dir = str(self.run_dir)
        if step == "pretrain":
            if is_run_dir(self.run_dir):
                return ["pretrain", "--resume", run_dir, "--quiet"]
            args = ["pretrain", self.recipe, "--run-dir", run_dir, "--quiet"]
            for text in self.sets:
                args += ["--set", text]
            return args
        verb, _, mode = step.partition(":")
        extra = list(self.options.get(verb, []))
        # --force: a step is only ever rerun when it did not finish, so what it left is partial
        if verb == "finetune":
            return ["finetune", run_dir, "--mode", mode.upper(), "--quiet", "--force", *extra]
        return ["evaluate", run_dir, "--force", *extra]

    def _save(self, **state: Any) -> None:
        folder = Path(self.sweep_dir) / STATE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / f"{self.dir}.json", json.dumps(state) + "\n")

    def _clear_orphan(self) -> None:
        """A run directory holding only the lock file (killed between creating it and writing the marker) is
        started afresh; `pretrain` would refuse it as not empty."""
        d = self.run_dir
        if d.is_dir() and not (d / MARKER).exists() and [p.name for p in d.iterdir()] == [LOCK_FILE]:
            (d / LOCK_FILE).unlink()

    def __call__(self) -> str:
        rank = 0
        if self.distributed:
            import submitit  # the job runs where submitit started it
            rank = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False).rank
        rank0 = rank == 0
        # every rank reads what is done (only rank 0 writes it): they must agree on whether to pretrain at all
        done: list[str] = list(read_state(self.sweep_dir, self.dir).get("steps", []))
        suffix = "" if rank0 else f".rank{rank}"
        log_path = Path(self.sweep_dir) / LOG_DIR / f"{self.dir}{suffix}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        host = os.uname().nodename
        with open(log_path, "a") as log:
            for step in ["pretrain", *self.after]:
                if step in done:
                    continue
                if step != "pretrain" and not rank0:
                    return "done"  # the other ranks only train; rank 0 evaluates alone
                if rank0:
                    self._save(status="running", step=step, steps=done, pid=os.getpid(), host=host)
                    if step == "pretrain":
                        self._clear_orphan()
                if step != "pretrain":
                    for var in DIST_VARS:  # evaluation and fine-tuning run as one process
                        os.environ.pop(var, None)
                argv = self._argv(step)
                log.write(f"$ rsslctl {' '.join(argv)}\n")
                log.flush()
                try:
                    code = self.invoke(argv, log, self.threads)
                except BaseException:
                    if rank0:
                        self._save(status="interrupted", step=step, steps=done)
                    raise
                log.flush()
                if code in INTERRUPTED:
                    if rank0:
                        self._save(status="interrupted", step=step, steps=done)
                    raise KeyboardInterrupt(code - 128)
                if code != 0:
                    if rank0:
                        self._save(status="failed", step=step, steps=done, exit_code=code,
                                   error=_last_line(log_path))
                    return "failed"
                done.append(step)
        if rank0:
            self._save(status="done", steps=done)
        return "done"

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit, on preemption or timeout: requeue this same job; it resumes every step from disk."""
        import submitit
        return submitit.helpers.DelayedSubmission(self)


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""
