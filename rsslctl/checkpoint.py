"""Checkpoints: safetensors tensors + JSON metadata, written atomically; nothing is ever unpickled.

Layout of one checkpoint directory (``<run>/checkpoints/epoch-0003/``):
  model.safetensors  the method's state (encoder, heads, momentum encoders …)
  state.safetensors  optimizer tensors, RNG states and extra run state (e.g. the current coreset indices)
  meta.json          epoch, step, metrics, resolved recipe, plugin versions, optimizer hyper-parameters,
                     sha256 of both tensor files; written last, so a directory with it is complete
The directory is assembled under a temporary name and renamed into place (atomic on POSIX).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

CKPT_DIR = "checkpoints"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Atomic safetensors write; ``metadata`` is stored as JSON strings in the file header."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file_like_open({k: _plain(v) for k, v in tensors.items()}, tmp,
                        metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in rest["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def derive_seed(seed: int, index: int) -> int:
    """The seed of part ``index`` (an epoch, a minibatch, a selection round) of a run seeded with ``seed``: distinct
    for every (seed, index) pair a run can meet, so parts never share random streams."""
    return seed * 1_000_003 + index


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda{i}"] = s
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(run_dir: Path, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], keep: int = 2, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``<run>/checkpoints/epoch-XXXX`` atomically and prune to the ``keep`` newest; ``extra`` tensors go
    into state.safetensors next to the optimizer and RNG state."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:04d}"
    tmp = root / f".tmp-epoch-{epoch:04d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    opt_tensors, opt_rest = optimizer_to_flat(optimizer)
    save_file_like_open({k: _plain(v) for k, v in model.state_dict().items()}, tmp / "model.safetensors",
                        metadata={"epoch": str(epoch), "format": "pt"})
    save_file_like_open({k: _plain(v) for k, v in {**opt_tensors, **rng_state(), **(extra or {})}.items()},
                        tmp / "state.safetensors")
    meta = dict(meta, epoch=epoch, optimizer=opt_rest,
                sha256={f: sha256(tmp / f) for f in ("model.safetensors", "state.safetensors")})
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2, default=str))
    if final.exists():  # re-saving the same epoch (after a resume): move the old one aside first
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(p for p in root.glob("epoch-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory (one with meta.json), or None."""
    root = Path(run_dir) / CKPT_DIR
    done = sorted(p for p in root.glob("epoch-*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def read_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def load_checkpoint(ckpt: Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model tensors, state tensors, meta); the sha256 of each file is checked against meta.json."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if verify:
        for name, digest in meta["sha256"].items():
            if sha256(ckpt / name) != digest:
                raise UserError(f"{ckpt / name}: checksum mismatch (file corrupted); delete {ckpt} to resume from an older checkpoint")
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "state.safetensors")), meta
