"""Where a sweep's jobs run: here (one after another, or N processes sharing the CPU threads) or on a Slurm cluster
through submitit (one job array; each job requeues itself on preemption or timeout and resumes from disk)."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rsslctl.base.errors import UserError
from rsslctl.sweep.job import RunJob, read_state, run_status, subprocess_invoke
from rsslctl.sweep.progress import Tracker

#: submitit's own executors that run a job array without a cluster (for tests and trying a sweep out)
TEST_CLUSTERS = ("local", "debug")


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_local(jobs: list[RunJob], tracker: Tracker, parallel: int = 1) -> None:
    """One job after another in this process, or ``parallel`` at a time, each verb a subprocess with an equal
    share of the CPU threads (so N jobs do not oversubscribe the cores N times)."""
    def one(job: RunJob) -> None:
        tracker.set(job.dir, "running")
        status = job()
        state = read_state(job.sweep_dir, job.dir)
        note = f"{state.get('step')} exited with {state.get('exit_code')}: {state.get('error', '')}" \
            if status == "failed" else ""
        tracker.set(job.dir, status, note)

    if parallel <= 1:
        for job in jobs:
            one(job)
        return
    threads = max(1, cpu_threads() // parallel)
    for job in jobs:
        job.invoke, job.threads = subprocess_invoke, threads
    pool = concurrent.futures.ThreadPoolExecutor(parallel)
    futures = [pool.submit(one, job) for job in jobs]
    try:
        for f in concurrent.futures.as_completed(futures):
            f.result()
    except BaseException:
        for f in futures:
            f.cancel()  # jobs not started yet stay pending; running ones stop on their own signal
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass
class SlurmOptions:
    """What a sweep asks the cluster for, per run: nodes × GPUs (one process per GPU), time, partition."""

    partition: str | None = None
    gpus_per_node: int = 0
    nodes: int = 1
    time_min: int = 24 * 60
    cpus_per_task: int | None = None
    extra: dict[str, str] = dataclasses.field(default_factory=dict)  # further sbatch settings (account, qos, …)
    cluster: str = "slurm"  # "local"/"debug": submitit's executors without a cluster, same code path
    poll_s: float = 30.0
    tasks_per_node: int = 0  # processes per node; 0 = one per GPU (one in all without GPUs)

    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


def parse_time(text: str) -> int:
    """Slurm's time formats (``MM``, ``HH:MM:SS``, ``D-HH:MM[:SS]``) → minutes."""
    try:
        days, _, rest = text.rpartition("-")
        parts = [int(p) for p in rest.split(":")]
        if len(parts) == 1:
            minutes = parts[0] if not days else parts[0] * 60
        elif len(parts) == 2:
            minutes = parts[0] * 60 + parts[1] if days else parts[0] + (parts[1] > 0)
        elif len(parts) == 3:
            minutes = parts[0] * 60 + parts[1] + (parts[2] > 0)
        else:
            raise ValueError(text)
        minutes += int(days or 0) * 24 * 60
    except ValueError:
        raise UserError(f"--time {text!r}: expected minutes or HH:MM:SS (or D-HH:MM:SS), e.g. --time 12:00:00") \
            from None
    if minutes <= 0:
        raise UserError(f"--time {text!r}: must be at least one minute")
    return minutes


def check_slurm(options: SlurmOptions) -> None:
    """Before anything is created: submitit is installed, and a real cluster has sbatch."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError("--executor slurm needs submitit; install it with `pip install 'rsslctl[slurm]'`") from None
    if options.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--executor slurm: no Slurm here (sbatch not found); run the sweep on a cluster login "
                        "node, or use --executor local")
    if options.cluster == "local" and options.nodes > 1:
        raise UserError("--nodes: submitit's local executor runs on one node; use --nodes 1")


def make_executor(folder: Path, options: SlurmOptions, parallel: int, name: str) -> Any:
    """A submitit executor asking, per run, for ``options`` (``parallel`` > 0 caps the array's running tasks)."""
    import submitit
    executor = submitit.AutoExecutor(folder=Path(folder), cluster=options.cluster)
    params: dict[str, Any] = {"name": name, "timeout_min": options.time_min, "nodes": options.nodes,
                              "tasks_per_node": options.tasks(), "slurm_additional_parameters": dict(options.extra)}
    if options.gpus_per_node:
        params["gpus_per_node"] = options.gpus_per_node
    if options.cpus_per_task:
        params["cpus_per_task"] = options.cpus_per_task
    if options.partition:
        params["slurm_partition"] = options.partition
    if parallel:
        params["slurm_array_parallelism"] = parallel
    executor.update_parameters(**params)
    return executor


def run_slurm(jobs: list[RunJob], tracker: Tracker, options: SlurmOptions, parallel: int = 0) -> None:
    """Submit the jobs as one array and follow them until each has ended; statuses come from the jobs' own state
    files (the jobs write them on the cluster)."""
    for job in jobs:
        job.distributed = options.nodes * options.tasks() > 1
        if options.cluster != "debug":
            # a verb per process: submitit's preemption signal (USR2) then reaches the job itself, which stops
            # the verb (its checkpoints kept) and requeues; the debug executor runs jobs here, in this process
            job.invoke = subprocess_invoke
    executor = make_executor(Path(tracker.out) / "submitit", options, parallel, f"rsslctl-sweep-{tracker.digest[:8]}")
    submitted = executor.submit_array(jobs)
    for job, sj in zip(jobs, submitted):
        tracker.log(f"{job.name} ({job.dir}) submitted as job {sj.job_id}")
    waiting = dict(zip([j.dir for j in jobs], submitted))
    while waiting:
        for run, sj in list(waiting.items()):
            if sj.done():  # DebugExecutor: runs the job here, now
                waiting.pop(run)
                try:
                    sj.results()
                    status = run_status(tracker.out, run)
                    note = "" if status != "failed" else read_state(tracker.out, run).get("error", "")
                except Exception as exc:  # noqa: BLE001 — the job crashed or was cancelled; its log says why
                    status, note = "failed", f"job {sj.job_id}: {str(exc).splitlines()[-1][:200] if str(exc) else exc}"
                tracker.set(run, "done" if status == "done" else "failed" if status == "failed" else "pending", note)
            elif run_status(tracker.out, run) == "running":  # queued jobs stay pending
                tracker.set(run, "running")
        if waiting:
            time.sleep(options.poll_s)
