"""Joining the process group within a bounded time, and checking that every rank runs the same thing.

``join`` is torch's own ``env://`` rendezvous (what ``init_process_group`` does by default) with two timeouts
instead of one: a short one for the peers to show up (a missing rank is reported in one line, not waited for
for an hour) and a long one for the collectives, where rank 0 may legitimately run the monitors, write checkpoints
or evaluate while the others wait. ``agree`` all-gathers a digest of the resolved recipe and of the code, so ranks
started with different recipes, seeds or installations stop at once with one line naming the rank and the key.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rsslctl.base.errors import UserError
from rsslctl.runtime.launch import check_port

#: keys that may differ between ranks: where each machine keeps the same data
MAY_DIFFER = frozenset({"data.root"})


class RankMismatch(UserError):
    """Ranks disagree; ``rank`` is the first rank that differs from rank 0 (every rank raises the same error)."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


def join(backend: str, device: torch.device | None, join_timeout_s: float, timeout_s: float) -> None:
    """``init_process_group`` from torchrun's environment; UserError (one line) when MASTER_PORT is no port or
    the other ranks do not show up within ``join_timeout_s``. Collectives then time out after ``timeout_s``."""
    port = check_port(os.environ.get("MASTER_PORT", ""), "MASTER_PORT")
    addr = os.environ.get("MASTER_ADDR", "")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    collective = datetime.timedelta(seconds=timeout_s)
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=join_timeout_s)))
    except (dist.DistError, RuntimeError, ValueError, TimeoutError) as exc:
        raise UserError(f"rank {rank} of {world}: the other ranks did not join at {addr}:{port} within "
                        f"{join_timeout_s:g} s ({' '.join(str(exc).split())[:160]}); start all {world} processes "
                        f"(e.g. `rsslctl pretrain --nproc-per-node {world} ...`) or raise engine.join_timeout_s") \
            from None
    store.set_timeout(collective)
    # as init_process_group does with the store of its own rendezvous
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world,
                            timeout=collective, device_id=device if backend == "nccl" else None)


def code_fingerprint(classes: tuple[type, ...] = ()) -> str:
    """sha256 of torch's version, rsslctl's sources (its version included) and the source files of ``classes``
    (the plugins a run uses)."""
    import inspect

    # rsslctl's version is in its sources (the package root), which are hashed below: nothing here imports the root
    h = hashlib.sha256(f"torch {torch.__version__}".encode())
    root = Path(__file__).resolve().parents[1]
    files = [(str(p.relative_to(root)), p) for p in sorted(root.rglob("*.py"))]
    for cls in classes:
        source = inspect.getsourcefile(cls)
        if source:
            files.append((f"{cls.__module__}.{cls.__qualname__}", Path(source)))
    for name, path in files:
        h.update(name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def flat(resolved: dict[str, Any]) -> dict[str, str]:
    """``table.key`` → JSON of the value, for every key of a resolved recipe but those in ``MAY_DIFFER``."""
    out = {}
    for table, values in resolved.items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            name = f"{table}.{key}" if key else table
            if name not in MAY_DIFFER:
                out[name] = json.dumps(value, sort_keys=True, default=str)
    return out


def agree(resolved: dict[str, Any], plugins: dict[type, str] | None = None) -> None:
    """Every rank has the same resolved recipe (run.seed included) and code (``plugins``: the plugin classes the run
    uses → their package and version), else RankMismatch on every rank, naming the first rank that differs from
    rank 0 and the first key. One all-gather; a no-op alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    plugins = plugins or {}
    mine = {**flat(resolved), "code": code_fingerprint(tuple(plugins)),
            "plugins": json.dumps(sorted(plugins.values()))}
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (digest, mine))
    first_digest, first = gathered[0]
    for rank, (other_digest, theirs) in enumerate(gathered):
        if other_digest == first_digest:
            continue
        key = next(k for k in sorted(set(first) | set(theirs)) if first.get(k) != theirs.get(k))
        if key in ("code", "plugins"):
            raise RankMismatch(f"rank {rank} runs other code than rank 0 ({key}: {theirs.get(key, '')[:40]} there, "
                               f"{first.get(key, '')[:40]} on rank 0); install the same rsslctl, plugins and torch "
                               "on every machine", rank)
        there, here = theirs.get(key, "(unset)"), first.get(key, "(unset)")
        raise RankMismatch(f"rank {rank} runs another recipe than rank 0: {key} = {there} there, {here} on rank 0; "
                           "start every rank with the same recipe and --set options", rank)
