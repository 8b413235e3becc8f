"""`rsslctl sweep`: seeds × a grid of recipe values, each run pretrained then evaluated (or fine-tuned), here or on
Slurm. See docs/sweeps.md."""
from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

import click
from rich.console import Console
from rich.table import Table

from rsslctl.base.console import console
from rsslctl.base.errors import UserError
from rsslctl.cli.common import SET, fail, user_errors
from rsslctl.run.sweep import (
    LOG,
    MANIFEST,
    MAX_RUNS,
    SweepSpec,
    check_owner,
    expand,
    is_sweep_file,
    load_spec,
    parse_grid_flag,
    sweep_hash,
)
from rsslctl.sweep.executors import TEST_CLUSTERS, SlurmOptions, check_slurm, parse_time, run_local, run_slurm
from rsslctl.sweep.job import LOG_DIR, RunJob, run_status


def invoke_inprocess(argv: list[str], log: TextIO, threads: int) -> int:
    """Run ``rsslctl ARGV`` in this process, its output into ``log``; the verb's exit code."""
    # the group is looked up when a run starts: app registers this verb, so an import here would be a cycle
    main = importlib.import_module("rsslctl.cli.app").main
    if threads:
        import torch
        torch.set_num_threads(threads)
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            main.main(list(argv), prog_name="rsslctl", standalone_mode=False)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except click.exceptions.Exit as exc:
            return exc.exit_code
        except Exception:  # noqa: BLE001 — only with RSSLCTL_TRACEBACK set; the log keeps it
            traceback.print_exc(file=log)
            return 1
    return 0


class SweepCommand(click.Command):
    """``--seeds 0 1 2`` (space-separated, as well as ``--seeds 0,1,2`` or repeated) becomes one ``--seeds`` each."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(args):
            out.append(args[i])
            if args[i] == "--seeds":
                i += 1
                first = True
                while i < len(args) and (first or _seed_like(args[i])):
                    if not first:
                        out.append("--seeds")
                    out.append(args[i])
                    first = False
                    i += 1
                continue
            i += 1
        return super().parse_args(ctx, out)


def _seed_like(text: str) -> bool:
    return all(p.strip().isdigit() for p in text.split(",") if p.strip()) and any(c.isdigit() for c in text)


def _seeds(values: tuple[str, ...]) -> list[int] | None:
    if not values:
        return None
    seeds: list[int] = []
    for text in values:
        for part in text.split(","):
            if not part.strip().isdigit():
                raise UserError(f"--seeds {text!r}: expected integers, e.g. --seeds 0 1 2")
            seeds.append(int(part))
    return seeds


def _spec(source: Path, seeds: tuple[str, ...], grid: tuple[str, ...], overrides: tuple[str, ...],
          after: tuple[str, ...]) -> SweepSpec:
    spec = load_spec(source) if Path(source).is_file() and is_sweep_file(source) else SweepSpec(recipe=str(source))
    if seeds:
        spec.seeds = _seeds(seeds)
    for text in grid:
        key, values = parse_grid_flag(text)
        spec.grid[key] = values
    spec.overrides += list(overrides)
    if Path(spec.recipe).is_file():  # jobs may start elsewhere (a cluster node, another working directory)
        spec.recipe = str(Path(spec.recipe).resolve())
    if after:
        spec.after = [] if list(after) == ["none"] else [a for text in after for a in text.split(",") if a]
    return spec


def _slurm_options(file: dict[str, Any], flags: dict[str, Any]) -> SlurmOptions:
    """Cluster settings: a flag wins over the sweep file's [slurm] table."""
    table = file.get("slurm", {})
    if not isinstance(table, dict):
        raise UserError("sweep file: [slurm] must be a table (partition, gpus_per_node, nodes, time, ...)")
    known = ("partition", "gpus_per_node", "nodes", "tasks_per_node", "time", "cpus_per_task", "extra")
    for key in table:
        if key not in known:
            raise UserError(f"sweep file: [slurm] unknown key '{key}'; valid keys: {', '.join(known)}")

    def pick(key: str) -> Any:
        return flags[key] if flags.get(key) is not None else table.get(key)

    extra = dict(table.get("extra", {}))
    for text in flags["slurm_arg"]:
        if "=" not in text:
            raise UserError(f"--slurm-arg {text!r}: expected KEY=VALUE, e.g. --slurm-arg account=myproject")
        key, value = text.split("=", 1)
        extra[key.strip()] = value.strip()
    time = pick("time")
    return SlurmOptions(partition=pick("partition"), gpus_per_node=int(pick("gpus_per_node") or 0),
                        nodes=int(pick("nodes") or 1), time_min=parse_time(str(time)) if time else 24 * 60,
                        cpus_per_task=pick("cpus_per_task"), tasks_per_node=int(pick("tasks_per_node") or 0),
                        extra=extra, cluster=flags["cluster"],
                        poll_s=0.5 if flags["cluster"] in TEST_CLUSTERS else 30.0)


def _plan_table(title: str, out: Path, runs: list[Any], status: dict[str, str]) -> Table:
    table = Table(title=title)
    for col in ("run", "directory", "seed", "status"):
        table.add_column(col)
    for r in runs:
        table.add_row(r.name, str(out / r.dir), str(r.seed), status.get(r.dir, "pending"))
    return table


@click.command(cls=SweepCommand)
@click.argument("source", metavar="SWEEP_OR_RECIPE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seeds", multiple=True, metavar="N [N …]", help="Seeds, e.g. --seeds 0 1 2 (default: the recipe's).")
@click.option("--grid", multiple=True, metavar="KEY=V1,V2",
              help="A recipe value to sweep, e.g. --grid method.temperature=0.2,0.5 (repeatable: the product).")
@SET
@click.option("--after", multiple=True, metavar="STEP",
              help="Steps after pretraining: evaluate (default), finetune:slf|alf|aff|all, or none (repeatable).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The sweep directory (one run directory per run, sweep.json, sweep.log).")
@click.option("--jobs", type=click.IntRange(1, 1024), default=None,
              help="Runs at a time (local: processes sharing the CPU threads; slurm: array parallelism).")
@click.option("--executor", type=click.Choice(["local", "slurm"]), default=None,
              help="Where the runs go (default local).")
@click.option("--partition", help="slurm: partition.")
@click.option("--gpus-per-node", type=click.IntRange(0), default=None, help="slurm: GPUs per node (one process each).")
@click.option("--nodes", type=click.IntRange(1), default=None, help="slurm: nodes per run (distributed training).")
@click.option("--time", help="slurm: time limit per job, e.g. 12:00:00; a run that hits it is requeued and resumes.")
@click.option("--tasks-per-node", type=click.IntRange(1), default=None,
              help="slurm: processes per node (default one per GPU).")
@click.option("--cpus-per-task", type=click.IntRange(1), default=None, help="slurm: CPUs per process.")
@click.option("--slurm-arg", multiple=True, metavar="KEY=VALUE", help="slurm: another sbatch setting, e.g. account=x.")
@click.option("--cluster", type=click.Choice(["slurm", *TEST_CLUSTERS]), default="slurm", hidden=True,
              help="slurm: submitit's local or debug executor instead of a cluster (testing).")
@click.option("--yes", is_flag=True, help=f"Allow a sweep of more than {MAX_RUNS} runs.")
@click.option("--dry-run", is_flag=True, help="List the runs and stop; nothing is created.")
@click.option("--quiet", is_flag=True, help="No live progress (sweep.log has it).")
@user_errors
def sweep(source: Path, seeds: tuple[str, ...], grid: tuple[str, ...], overrides: tuple[str, ...],
          after: tuple[str, ...], out: Path, jobs: int | None, executor: str | None, yes: bool, dry_run: bool,
          quiet: bool, **slurm_flags: Any) -> None:
    """Pretrain every run of a sweep (SWEEP file, or a RECIPE with --seeds/--grid) and run its steps after
    pretraining. Rerunning the same command skips finished runs and resumes interrupted ones."""
    spec = _spec(source, seeds, grid, overrides, after)
    executor = executor or spec.settings.get("executor", "local")
    if executor not in ("local", "slurm"):
        raise UserError(f"sweep file: executor = {executor!r}; choose \"local\" or \"slurm\"")
    jobs = jobs or int(spec.settings.get("jobs", 0))  # 0: local one at a time, slurm as many as the cluster allows
    slurm = _slurm_options(spec.settings, slurm_flags) if executor == "slurm" else None
    if slurm is not None:
        check_slurm(slurm)
    runs = expand(spec, MAX_RUNS, yes)
    digest = sweep_hash(spec, runs)
    check_owner(out, digest)
    status = {r.dir: run_status(out, r.dir) for r in runs} if out.is_dir() else {}
    if dry_run:
        console.print(_plan_table(f"sweep {digest}: {len(runs)} runs, then {', '.join(spec.after) or 'nothing'}",
                                  out, runs, status))
        return
    out.mkdir(parents=True, exist_ok=True)
    from rsslctl.sweep.progress import Tracker
    live = Console(file=sys.stdout)  # bound now: the verbs' own output is redirected into the runs' logs
    tracker = Tracker(out, digest, spec, runs, status, live, live=not quiet)
    todo = [r for r in runs if status.get(r.dir) not in ("done", "running")]
    tracker.log(f"sweep {digest}: {len(runs)} runs, {len(runs) - len(todo)} done or running elsewhere, "
                f"{len(todo)} to run on {executor}" + (f" ({jobs} at a time)" if jobs else ""))
    work = [RunJob(str(out.resolve()), r.dir, r.name, spec.recipe, r.sets, spec.after, spec.options, invoke_inprocess)
            for r in todo]
    try:
        with tracker:
            if slurm is not None:
                run_slurm(work, tracker, slurm, jobs)
            else:
                run_local(work, tracker, max(1, jobs))
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        for run in runs:
            if tracker.status.get(run.dir) == "running":
                tracker.set(run.dir, "pending", "interrupted")
        tracker.log(f"interrupted ({signal.Signals(signum).name})")
        click.echo(f"interrupted; what was checkpointed is kept: rerun the same command to resume ({out / MANIFEST})",
                   err=True)
        sys.exit(128 + signum)
    if not quiet:
        console.print(_plan_table(f"sweep {digest}: {tracker.line()}", out, runs, tracker.status))
    failed = list(tracker.failed())
    if failed:
        fail(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed[:3])}{', …' if len(failed) > 3 else ''}); "
             f"see {out / LOG} and {out / LOG_DIR}/, then rerun the same command to retry them", 1)
