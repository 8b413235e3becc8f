"""Checkpoints: safetensors tensors + JSON metadata, written atomically; nothing is ever unpickled.

Layout of one checkpoint directory (``<run>/checkpoints/epoch-0003/``):
  model.safetensors  the method's state (encoder, heads, momentum encoders …)
  state.safetensors  optimizer tensors, RNG states and extra run state (e.g. the current coreset indices)
  meta.json          epoch, position in the next epoch (mid-epoch checkpoints), metrics, resolved recipe, plugin
                     versions, optimizer hyper-parameters, sha256 of both tensor files; written last, so a directory
                     with it is complete
The directory is assembled under a temporary name and renamed into place (atomic on POSIX).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file as _save_file

from rsslctl.base.errors import UserError
from rsslctl.base.files import atomic_write_text  # noqa: F401 (re-exported: checkpoint files and their meta)
from rsslctl.runtime.distributed import gather_to_main, is_main, launched, rank

CKPT_DIR = "checkpoints"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with its I/O failures (disk full, read-only, file too large) raised as the OSError
    they are, so every command reports them as one line."""
    try:
        _save_file(tensors, path, metadata=metadata)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 — safetensors wraps OS errors in its own exception type
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


UMASK = _umask()


def save_file_like_open(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, but with the permissions ``open()`` would give (it creates files 0600 whatever the
    umask, which hides checkpoints from the rest of a lab's group)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~UMASK)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Atomic safetensors write; ``metadata`` is stored as JSON strings in the file header."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file_like_open({k: _plain(v) for k, v in tensors.items()}, tmp,
                            metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or ±inf (one device sync)."""
    names = [k for k, v in tensors.items() if torch.is_floating_point(v) and v.numel()]
    if not names:
        return []
    flags = torch.stack([torch.isfinite(tensors[k]).all() for k in names]).cpu().tolist()
    return [k for k, ok in zip(names, flags) if not ok]


def refuse_nonfinite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """UserError naming the first non-finite tensor: weights that diverged are never evaluated or exported."""
    bad = nonfinite(tensors)
    if bad:
        raise UserError(f"{where}: {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]}); the run diverged "
                        "before this checkpoint — resume from an earlier one or retrain with a lower optimizer.lr")


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "") -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as tensors only, named ``{prefix}{parameter index}.{key}``: numbers as
    0-d float64 tensors, absent buffers (``None``, e.g. SGD without momentum) left out. The one serialiser of every
    optimizer state (the engine's, with prefix ``optim.``; a method's own in ``Method.run_state``). Hyper-parameters
    are not in it: the recipe rebuilds them (the engine also records them, see ``optimizer_groups``)."""
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            if value is None:
                continue
            out[f"{prefix}{idx}.{key}"] = value if isinstance(value, torch.Tensor) else \
                torch.tensor(float(value), dtype=torch.float64)
    return out


def optimizer_groups(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's param groups (hyper-parameters and parameter indices) as JSON-able dicts."""
    groups = opt.state_dict()["param_groups"]
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in groups]


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str = "",
                           groups: list[dict[str, Any]] | None = None, scalars: dict[str, Any] | None = None) -> None:
    """Restore what ``optimizer_tensors(opt, prefix)`` returned into ``opt`` (built with the same parameters and
    options), as copies; tensors without ``prefix`` are ignored. ``groups``: param groups recorded by
    ``optimizer_groups`` (None = keep ``opt``'s). ``scalars``: ``{"idx.key": value}``, where engine checkpoints of
    earlier releases kept non-tensor values (meta.json). A key without a parameter index (``prefix`` + ``key``, the
    earlier layout of a one-parameter optimizer such as a memory bank's) belongs to parameter 0."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*((n[len(prefix):], v) for n, v in tensors.items() if n.startswith(prefix)),
                        *(scalars or {}).items()]:
        idx, _, key = name.partition(".")
        if not idx.isdigit():
            idx, key = "0", name
        state.setdefault(int(idx), {})[key] = value.clone() if isinstance(value, torch.Tensor) else value  # own copy
    if groups is None:
        groups = opt.state_dict()["param_groups"]
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


def load_checkpoint_optimizer(opt: torch.optim.Optimizer, state: dict[str, torch.Tensor], meta: dict[str, Any]
                              ) -> None:
    """Restore the optimizer of an engine checkpoint (``state.safetensors`` and ``meta.json`` as loaded)."""
    rest = meta["optimizer"]
    load_optimizer_tensors(opt, state, "optim.", rest["param_groups"], rest.get("scalars"))


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random states: the CPU's and, alone, every CUDA device's; under torchrun (one GPU per rank) only
    its own device's, as ``rng.cuda`` (querying the others would open a CUDA context on every GPU from every rank)."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        if launched():
            out["rng.cuda"] = torch.cuda.get_rng_state()
        else:
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                out[f"rng.cuda{i}"] = s
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():  # a rank's own device (see rng_state)
        torch.cuda.set_rng_state(tensors["rng.cuda"])
        return
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def rank_states(mine: dict[str, torch.Tensor], rng: Callable[[], dict[str, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
    """What a checkpoint stores besides rank 0's own state: on rank 0, ``mine`` plus every other rank's ``mine`` and
    random state (``rng()``) under ``rank<r>.``; ``mine`` alone on the other ranks (they write nothing)."""
    ranks = gather_to_main(mine if is_main() else {**rng(), **mine})
    out = dict(mine)
    for r, state in list(enumerate(ranks or []))[1:]:
        out.update({f"rank{r}.{k}": v for k, v in state.items()})
    return out


def own_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's part of a checkpoint's state tensors (see ``rank_states``): all of it on rank 0."""
    if is_main():
        return state
    prefix = f"rank{rank()}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def save_checkpoint(run_dir: Path, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], keep: int = 2, extra: dict[str, torch.Tensor] | None = None,
                    position: int = 0) -> Path:
    """Write ``<run>/checkpoints/epoch-XXXX`` atomically and prune to the ``keep`` newest; ``extra`` tensors go
    into state.safetensors next to the optimizer and RNG state. ``position`` > 0: a checkpoint inside epoch
    ``epoch + 1``, after that many of its minibatches (``epoch-XXXX-step-YYYYYYY``, sorting between the epochs)."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}" + (f"-step-{position:07d}" if position else "")
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model_state = model.state_dict()
    bad = nonfinite(model_state)
    if bad:  # a checkpoint is 'good' only if its weights are finite
        from rsslctl.base.errors import TrainingDiverged
        raise TrainingDiverged(f"weights became non-finite by epoch {epoch} ({bad[0]}); nothing was saved for this "
                               "epoch; lower optimizer.lr or set engine.grad_clip, then resume with --resume")
    try:
        tmp.mkdir()
        opt_tensors = optimizer_tensors(optimizer, "optim.")
        save_file_like_open({k: _plain(v) for k, v in model_state.items()}, tmp / "model.safetensors",
                            metadata={"epoch": str(epoch), "format": "pt"})
        save_file_like_open({k: _plain(v) for k, v in {**opt_tensors, **rng_state(), **(extra or {})}.items()},
                            tmp / "state.safetensors")
        meta = dict(meta, epoch=epoch, position=position, optimizer={"param_groups": optimizer_groups(optimizer)},
                    sha256={f: sha256(tmp / f) for f in ("model.safetensors", "state.safetensors")})
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2, default=str))
        if final.exists():  # re-saving the same epoch (after a resume): the new one replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:  # disk full, read-only, interrupted: leave no half-written directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.glob("epoch-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary checkpoint directories and files a crashed or killed writer left behind (call only
    while holding the run's lock); returns what was removed."""
    removed = []
    for pattern in (f"{CKPT_DIR}/.tmp-epoch-*", ".*.tmp-*", f"{CKPT_DIR}/.*.tmp-*"):
        for p in Path(run_dir).glob(pattern):
            if pid_alive(p.name.rpartition("-")[2]):  # e.g. an evaluate writing eval.json right now
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def pid_alive(pid: str) -> bool:
    """Whether another process ``pid`` (the suffix of a temporary name) still runs on this machine; this process's
    own temporaries, left by an earlier failed attempt, count as stale."""
    try:
        if int(pid) == os.getpid():
            return False
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories (those with meta.json), oldest first."""
    return sorted(p for p in (Path(run_dir) / CKPT_DIR).glob("epoch-*") if (p / "meta.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory (one with meta.json), or None."""
    done = checkpoints(run_dir)
    return done[-1] if done else None


class CorruptCheckpoint(UserError):
    """A checkpoint directory whose files are missing, truncated or do not match their recorded checksums."""

    def __init__(self, ckpt: Path, why: str) -> None:
        super().__init__(f"{ckpt}: corrupt checkpoint ({why})")
        self.ckpt, self.why = Path(ckpt), why


def read_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json of a checkpoint; CorruptCheckpoint when it is truncated, empty or lacks its required keys."""
    try:
        meta = json.loads((Path(ckpt) / "meta.json").read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(ckpt, f"meta.json unreadable: {str(exc)[:120]}") from None
    missing = [k for k in ("epoch", "sha256") if not isinstance(meta, dict) or k not in meta]
    if missing or not isinstance(meta["sha256"], dict) or not isinstance(meta["epoch"], int):
        raise CorruptCheckpoint(ckpt, f"meta.json lacks {missing[0] if missing else 'a valid epoch/sha256'}")
    return meta


def load_checkpoint(ckpt: Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                              dict[str, Any]]:
    """(model tensors, state tensors, meta); each file is read once and its sha256 checked against meta.json, so
    the tensors are exactly the bytes that were checked. FileNotFoundError when the directory vanished while being
    read (a writer pruned it); CorruptCheckpoint for anything else that is wrong with it."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    out = []
    for name in ("model.safetensors", "state.safetensors"):
        try:
            data = (ckpt / name).read_bytes()
        except FileNotFoundError:
            if not ckpt.is_dir():
                raise
            raise CorruptCheckpoint(ckpt, f"{name} is missing") from None
        digest = meta["sha256"].get(name)
        if verify and digest != hashlib.sha256(data).hexdigest():
            raise CorruptCheckpoint(ckpt, f"{name}: checksum mismatch")
        try:
            out.append(load_bytes(data))
        except Exception as exc:  # noqa: BLE001 — safetensors raises its own error types for malformed headers
            raise CorruptCheckpoint(ckpt, f"{name}: {str(exc)[:120]}") from None
    return out[0], out[1], meta


def load_latest(run_dir: Path, tries: int = 5
                ) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]] | None:
    """(checkpoint, model, state, meta) of the newest checkpoint, read consistently while a writer may be saving
    and pruning: a checkpoint that disappears mid-read is replaced by the then-newest one. None if there is none."""
    for _ in range(tries):
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            return None
        try:
            return (ckpt, *load_checkpoint(ckpt))
        except FileNotFoundError:
            continue
        except CorruptCheckpoint:  # half-deleted by a pruning writer, unless it is still the newest one
            if ckpt.is_dir() and latest_checkpoint(run_dir) == ckpt:
                raise
    raise UserError(f"{run_dir}: its checkpoints changed {tries} times while being read; retry")
