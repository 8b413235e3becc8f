"""``rsslctl VERB --nproc-per-node N``: start the ranks of a run through torch's elastic launcher (what ``torchrun``
runs), and turn a rank's failure into that rank's one line instead of torchrun's ``ChildFailedError`` report.

Both halves of the error protocol live here. A child that fails writes one JSON record to the file torch elastic
names in ``TORCHELASTIC_ERROR_FILE`` (torch's own error-file format: ``message`` + ``timestamp``, plus our
``rsslctl`` fields), so plain ``torchrun`` shows the same line in its report; the parent reads every rank's record
from the launcher's log directory and prints the primary ones, one line per distinct error. A record is
*secondary* when the error only echoes another rank's (a collective that lost its peer, rank 0's failure handed on
by ``rank0_does``), and is shown only when no rank recorded a primary one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rsslctl.base.errors import UserError

#: set by the launcher in every child's environment: the parent prints the children's errors and interruptions
CHILD_ENV = "RSSLCTL_LAUNCHED"
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # torch elastic's per-rank error file
#: seconds the ranks still running get between SIGTERM and SIGKILL once one failed: a rank blocked in a collective
#: with the failed one cannot act on SIGTERM (checkpoints are written atomically, so nothing is lost)
SHUTDOWN_S = 5


class LaunchFailed(UserError):
    """Some ranks failed: ``lines`` holds one line per distinct error, ``exit_code`` the first one's code."""

    def __init__(self, lines: list[str], exit_code: int) -> None:
        super().__init__(lines[0] if lines else "a rank failed")
        self.lines = lines
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """Where and how many ranks: ``nproc_per_node`` processes on each of ``nnodes`` machines. One machine needs no
    endpoint (a local rendezvous on a free port); several meet at ``rdzv_endpoint`` (HOST:PORT of one of them), with
    ranks assigned by the rendezvous, or by ``node_rank`` (0 … nnodes-1) when it is given."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str = ""
    join_timeout_s: int = 300

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def check_port(text: str, where: str) -> int:
    """A TCP port (1 … 65535) from ``text``; UserError naming ``where`` otherwise."""
    try:
        port = int(str(text).strip())
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise UserError(f"{where}: {text!r} is not a TCP port; use a free port between 1 and 65535 (e.g. 29500)")
    return port


def check_spec(spec: LaunchSpec) -> None:
    """One line for launch options that cannot work."""
    if spec.nproc_per_node < 1 or spec.nnodes < 1:
        raise UserError("--nproc-per-node and --nnodes must be at least 1")
    if spec.nnodes > 1 and not spec.rdzv_endpoint:
        raise UserError(f"--nnodes {spec.nnodes}: pass --rdzv-endpoint HOST:PORT (one machine of the run, the same "
                        "on every machine)")
    if spec.node_rank is not None and not 0 <= spec.node_rank < spec.nnodes:
        raise UserError(f"--node-rank {spec.node_rank}: must be between 0 and {spec.nnodes - 1} "
                        f"(--nnodes {spec.nnodes})")
    if spec.rdzv_endpoint:
        host, sep, port = spec.rdzv_endpoint.rpartition(":")
        if not sep or not host:
            raise UserError(f"--rdzv-endpoint {spec.rdzv_endpoint!r}: expected HOST:PORT, e.g. node0:29500")
        check_port(port, "--rdzv-endpoint port")


def launch(argv: list[str], spec: LaunchSpec) -> None:
    """Run ``python -m rsslctl.cli *argv`` as this machine's ``spec.nproc_per_node`` ranks and wait for them.
    Returns when every rank succeeded; raises ``LaunchFailed`` (the failing ranks' lines) or KeyboardInterrupt
    (carrying the signal) when interrupted — the elastic agent has stopped every rank by then."""
    import logging

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_spec(spec)
    for name in list(logging.root.manager.loggerDict):  # each elastic module sets its own level: its report,
        if name.startswith("torch.distributed.elastic"):  # warnings included, is replaced by the lines below
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="rsslctl-launch-") as logs:
        if spec.node_rank is not None:  # fixed ranks: torchrun's classic static rendezvous at the endpoint
            backend, configs = "static", {"rank": spec.node_rank, "timeout": spec.join_timeout_s}
        else:
            backend, configs = "c10d", {"join_timeout": spec.join_timeout_s}
        config = LaunchConfig(
            min_nodes=spec.nnodes, max_nodes=spec.nnodes, nproc_per_node=spec.nproc_per_node,
            run_id="rsslctl" if spec.nnodes > 1 else uuid.uuid4().hex, role="rsslctl",
            rdzv_endpoint=spec.rdzv_endpoint or "localhost:0", rdzv_backend=backend, rdzv_configs=configs,
            max_restarts=0, monitor_interval=0.1, start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=logs, redirects=Std.ERR),
            shutdown_timeout=SHUTDOWN_S)
        os.environ[CHILD_ENV] = "1"
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N ranks must not each take every core
        try:
            elastic_launch(config, sys.executable)("-m", "rsslctl.cli", *argv)
            replay_stderr(Path(logs))
        except ChildFailedError as exc:
            raise failure(Path(logs), {r: f.exitcode for r, f in exc.failures.items()}) from None
        except SignalException as exc:
            raise KeyboardInterrupt(int(exc.sigval)) from None
        except Exception as exc:  # noqa: BLE001 — the rendezvous of several machines failed (timeout, endpoint)
            if type(exc).__module__.startswith("torch.distributed"):
                raise UserError(f"the machines of the run did not meet at {spec.rdzv_endpoint or 'localhost'} "
                                f"within {spec.join_timeout_s} s ({' '.join(str(exc).split())[:200]}); start the "
                                "same command on every machine, or raise engine.join_timeout_s") from None
            raise
        finally:
            os.environ.pop(CHILD_ENV, None)


def replay_stderr(logs: Path) -> None:
    """After a successful run, what local rank 0 wrote to stderr (notes, warnings). The ranks' stderr goes to files
    so that what a failing run's C++ runtime prints as its ranks are stopped ("terminate called …") never reaches
    the terminal beside the ranks' one-line errors."""
    for path in sorted(logs.glob("*/attempt_*/0/stderr.log")):
        sys.stderr.write(path.read_text(errors="replace"))


# -- the error records -------------------------------------------------------------------------------------------
def record_failure(text: str, exit_code: int, secondary: bool, rank: int | None = None) -> None:
    """Write this rank's failure for the launcher (a no-op outside torchrun or ``launch``): ``text`` is the line
    without its rank, ``rank`` the rank it is about (this one unless told)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    data = {"message": _named(text, [rank]), "timestamp": int(time.time()),  # what torchrun's own report shows
            "rsslctl": {"rank": rank, "text": text, "exit_code": exit_code, "secondary": secondary}}
    try:
        Path(path).write_text(json.dumps(data))
    except OSError:  # the launcher's directory is gone: nobody is left to tell
        pass


def failure(logs: Path, exit_codes: dict[int, int]) -> LaunchFailed:
    """The failing ranks' lines from every rank's error record under ``logs``: one per distinct error, naming the
    ranks it happened on, the primary records only when there are any. ``exit_codes`` (global rank → exit code of
    the ranks the launcher saw fail) speaks for ranks that recorded nothing, e.g. killed by a signal."""
    records = []
    for path in logs.rglob("error.json"):
        try:
            info = json.loads(path.read_text())["rsslctl"]
            records.append((int(info["rank"]), str(info["text"]), int(info["exit_code"]), bool(info["secondary"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    shown = [r for r in records if not r[3]] or records
    if not shown:
        return LaunchFailed([_no_record(rank, code) for rank, code in sorted(exit_codes.items())] or
                            ["the ranks failed without an error line; see their output above"], 1)
    ranks: dict[str, list[int]] = {}
    codes: dict[str, int] = {}
    for rank, text, code, _ in sorted(shown):
        ranks.setdefault(text, []).append(rank)
        codes.setdefault(text, code)
    lines = [_named(text, rs) for text, rs in ranks.items()]
    return LaunchFailed(lines, codes[next(iter(ranks))])


def _named(text: str, ranks: list[int]) -> str:
    """``text`` prefixed with the ranks it happened on, unless it starts by naming its rank already."""
    return text if len(ranks) == 1 and text.startswith(f"rank {ranks[0]} ") else f"{_ranks(ranks)}: {text}"


def _ranks(ranks: list[int]) -> str:
    """'rank 1', 'ranks 0, 1', 'ranks 0-7'."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))


def _no_record(rank: int, code: int) -> str:
    if code < 0:
        import signal
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (SIGKILL is often the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
        return f"rank {rank}: killed by {name}{hint}; see the machine's logs"
    return f"rank {rank}: exited with code {code} without an error line; see its output above"
