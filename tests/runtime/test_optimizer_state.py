"""One optimizer serialiser: engine checkpoints, memory banks and methods' own optimizers share it, and the
layouts earlier releases wrote still load."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from rsslctl import load_optimizer_tensors, optimizer_tensors
from rsslctl.method.memory import LearnableBank
from rsslctl.runtime.checkpoint import load_checkpoint, load_checkpoint_optimizer, save_checkpoint


def trained(opt_cls, **kw) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = opt_cls(model.parameters(), **kw)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    return model, opt


def fresh(model: torch.nn.Module, opt_cls, **kw) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    twin.load_state_dict(model.state_dict())
    return twin, opt_cls(twin.parameters(), **kw)


def same_next_step(a: tuple, b: tuple) -> None:
    """Both (model, optimizer) pairs take the same next step: the optimizer state was carried over exactly."""
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    for model, opt in (a, b):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    for p, q in zip(a[0].parameters(), b[0].parameters()):
        assert torch.equal(p, q)


def old_layout(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The engine checkpoint layout of the current release, written out here independently: tensors
    ``optim.{idx}.{key}`` in state.safetensors, other values and the param groups in meta.json."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def test_round_trip_carries_adam_and_sgd_state() -> None:
    for opt_cls, kw in ((torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.9)}),
                        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})):
        model, opt = trained(opt_cls, **kw)
        tensors = optimizer_tensors(opt, "x.")
        assert tensors and all(k.startswith("x.") for k in tensors)
        twin = fresh(model, opt_cls, **kw)
        load_optimizer_tensors(twin[1], {**tensors, "other.0.thing": torch.zeros(1)}, "x.")
        same_next_step((model, opt), twin)


def test_engine_checkpoint_of_the_old_layout_loads(tmp_path: Path) -> None:
    """A checkpoint whose optimizer numbers (and SGD's absent buffers) sit in meta.json, as the current release
    writes them, resumes to the same next step."""
    for opt_cls, kw in ((torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.9)}),
                        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.0})):
        model, opt = trained(opt_cls, **kw)
        ckpt = save_checkpoint(tmp_path / opt_cls.__name__, 1, model, opt, {})
        tensors, rest = old_layout(opt)
        if opt_cls is torch.optim.SGD:  # earlier torch kept SGD's absent buffers as None: meta.json's scalars
            rest["scalars"].update({f"{i}.momentum_buffer": None for i in range(4)})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(ckpt / "state.safetensors"))
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["optimizer"] = rest
        meta["sha256"]["state.safetensors"] = hashlib.sha256((ckpt / "state.safetensors").read_bytes()).hexdigest()
        (ckpt / "meta.json").write_text(json.dumps(meta))
        _, state, meta = load_checkpoint(ckpt)
        twin = fresh(model, opt_cls, **kw)
        twin[1].param_groups[0]["lr"] = 123.0  # the recorded groups are restored
        load_checkpoint_optimizer(twin[1], state, meta)
        assert twin[1].param_groups[0]["lr"] == kw["lr"]
        same_next_step((model, opt), twin)


def test_new_engine_checkpoint_round_trips(tmp_path: Path) -> None:
    model, opt = trained(torch.optim.AdamW, lr=0.01)
    ckpt = save_checkpoint(tmp_path, 2, model, opt, {})
    _, state, meta = load_checkpoint(ckpt)
    assert any(k.startswith("optim.") for k in state) and "scalars" not in meta["optimizer"]
    twin = fresh(model, torch.optim.AdamW, lr=0.01)
    load_checkpoint_optimizer(twin[1], state, meta)
    same_next_step((model, opt), twin)


def test_memory_bank_state_of_the_old_layout_loads() -> None:
    """Banks saved ``bank.momentum_buffer`` (no parameter index) before the serialiser was shared."""
    bank = LearnableBank(4, 3, lr=0.5, momentum=0.9, weight_decay=0.0)
    bank.fill(torch.randn(4, 3))
    bank.record(torch.randn(4, 3))
    bank.step()
    old = {"bank.momentum_buffer": bank.optimizer.state[bank.weight]["momentum_buffer"].clone(),
           "queue.0.x": torch.ones(2)}
    other = LearnableBank(4, 3, lr=0.5, momentum=0.9, weight_decay=0.0)
    other.load_state_dict(bank.state_dict())
    other.load_run_state(old, "bank")
    assert set(other.run_state("bank")) == {"bank.0.momentum_buffer"}
    d = torch.randn(4, 3)
    for b in (bank, other):
        b.record(d)
        b.step()
    assert torch.equal(bank.weight, other.weight)
