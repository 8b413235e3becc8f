"""Multi-task self-supervised pretraining (the idea of Jaiswal & Fan, "Multi-task Self-supervised Transfer Learning
for Adversarial Robustness"): one shared encoder trained on a weighted sum of the losses of any registered methods.

A recipe names the tasks as tables, each with a weight, optionally the method it runs (default: the table's name)
and that method's own options, validated by that method's ``Options`` and ``check_options``::

    [method]
    name = "multitask"
    [method.tasks.simclr]
    weight = 1.0
    temperature = 0.5
    [method.tasks.rotation]
    weight = 1.0

Loss = Σ_i w_i · L_i, each L_i being what the task's own ``training_step`` returns on the same minibatch (each task
draws its own views). Every task keeps its own heads and extra state (checkpointed under ``tasks.<name>.``); the
encoder is shared and stored once. At most one task may train the Encoder's projection head (``encoder(x)``):
classification pretext tasks put their heads on the backbone features instead, so SimCLR + rotation + jigsaw share
only the backbone, as in the paper.

Fidelity: no public code was found for the paper; this follows the generic multi-task formulation above (one shared
backbone, per-task heads, L = Σ_i w_i · L_i with each task's own registered loss).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import Tensor, nn

from rsslctl import Encoder, Method, UserError, as_dict, get_plugin, hookimpl, parse_number, validate
from rsslctl_plugins.methods.options import CITATION, MultitaskOptions

#: keys of a task table handled here; every other key is an option of the task's method
TASK_KEYS = ("weight", "method")
#: modules every task holds by reference to the shared ones (stored once, under the multi-task method's own keys)
SHARED = ("encoder", "augment")
LABEL = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


@dataclasses.dataclass(frozen=True)
class Task:
    label: str
    cls: type
    weight: float
    options: Any


def parse_tasks(options: MultitaskOptions, where: str = "method") -> list[Task]:
    """Validate every task table (its method's options by that method's rules); one clear line per problem."""
    if not options.tasks:
        raise UserError(f"{where}.tasks: no tasks; add tables such as [method.tasks.simclr] weight = 1.0")
    tasks: list[Task] = []
    seen: dict[str, str] = {}
    for label, table in options.tasks.items():
        loc = f"{where}.tasks.{label}"
        if not isinstance(label, str) or not LABEL.match(label):
            raise UserError(f"{where}.tasks: task name {label!r} must be lower-case letters, digits and _")
        if not isinstance(table, dict):
            raise UserError(f"{loc}: expected a table ([method.tasks.{label}] with weight and options), got {table!r}")
        name = table.get("method", label)
        if not isinstance(name, str):
            raise UserError(f"{loc}.method: expected a method name, got {name!r}")
        cls = get_plugin("method", name, f"{loc}.method" if "method" in table else loc)
        if issubclass(cls, Multitask):
            raise UserError(f"{loc}: a multi-task method cannot be one of its own tasks; list its tasks here instead")
        if name in seen:
            raise UserError(f"{loc}: duplicate task: method '{name}' is already task '{seen[name]}'; keep one and "
                            "set its weight")
        seen[name] = label
        weight = parse_number(table.get("weight", 1.0), f"{loc}.weight")
        if weight < 0:
            raise UserError(f"{loc}.weight: {weight} must be ≥ 0")
        sub = validate(cls.Options, {k: v for k, v in table.items() if k not in TASK_KEYS}, loc, extra_keys=TASK_KEYS)
        cls.check_options(sub, loc)
        tasks.append(Task(label, cls, weight, sub))
    heads = [t.label for t in tasks if t.cls.uses_projection_head]
    if len(heads) > 1:
        raise UserError(f"{where}.tasks: '{heads[0]}' and '{heads[1]}' would both train the encoder's projection head "
                        "(encoder.head_layers); keep one of them — pretext tasks bring their own heads")
    if sum(t.weight for t in tasks) <= 0:
        raise UserError(f"{where}.tasks: the weights sum to 0, so nothing would be trained; give a task weight > 0")
    return tasks


class Multitask(Method):
    """Multi-task pretraining: Σ_i w_i · L_i over registered methods sharing one encoder, each with its own heads."""

    name = "multitask"
    citation = CITATION["multitask"]
    Options = MultitaskOptions

    @classmethod
    def check_options(cls, options: MultitaskOptions, where: str) -> None:
        tasks = parse_tasks(options, where)
        # the resolved recipe records every task's complete options (defaults filled in)
        options.tasks = {t.label: {**({"method": t.cls.name} if t.cls.name != t.label else {}), "weight": t.weight,
                                   **as_dict(t.options)} for t in tasks}

    @classmethod
    def attack_needed(cls, options: MultitaskOptions) -> str:
        return next((f"method.tasks.{t.label}" for t in parse_tasks(options) if t.cls.attack_needed(t.options)), "")

    @classmethod
    def dual_bn_wanted(cls, options: MultitaskOptions) -> bool:
        return any(t.cls.dual_bn_wanted(t.options) for t in parse_tasks(options))

    def __init__(self, options: MultitaskOptions, encoder: Encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        tasks = parse_tasks(options)
        self.tasks = nn.ModuleDict()
        for t in tasks:
            method = t.cls(t.options, encoder, attack, augment)
            if method.replays != 1 or method.schedule_in_minibatches:
                raise UserError(f"method.tasks.{t.label}: replays each minibatch (free adversarial training), which a "
                                "multi-task step cannot share with the other tasks; use it on its own")
            self.tasks[t.label] = method
        self.weights = [t.weight for t in tasks]
        self._register_state_dict_hook(_drop_shared)
        self.register_load_state_dict_pre_hook(_restore_shared)

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        for method in self.tasks.values():
            method.on_epoch_start(epoch, total_epochs)

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        for (label, method), weight in zip(self.tasks.items(), self.weights):
            if weight == 0:  # switched off: no forward pass, no gradient
                continue
            loss, parts = method.training_step(images, labels)
            total = weight * loss if total is None else total + weight * loss
            metrics[f"{label}_loss"] = loss.detach()
            metrics.update({f"{label}_{k}": v for k, v in parts.items()})
        assert total is not None  # parse_tasks refuses an all-zero weighting
        return total, metrics

    def after_optimizer_step(self) -> None:
        for method in self.tasks.values():
            method.after_optimizer_step()

    def optimizer_parameters(self) -> list[nn.Parameter]:
        """Everything but what a task steps with its own optimizer."""
        own = {id(p) for m in self.tasks.values() for p in m.optimizer_parameters()}
        theirs = {id(p) for m in self.tasks.values() for p in m.parameters()} - own
        return [p for p in self.parameters() if p.requires_grad and id(p) not in theirs]

    def run_state(self) -> dict[str, Tensor]:
        return {f"{label}.{k}": v for label, m in self.tasks.items() for k, v in m.run_state().items()}

    def load_run_state(self, state: dict[str, Tensor]) -> None:
        for label, method in self.tasks.items():
            method.load_run_state({k[len(label) + 1:]: v for k, v in state.items() if k.startswith(f"{label}.")})


def _drop_shared(module: Multitask, state: dict[str, Tensor], prefix: str, local_metadata: Any) -> None:
    """The tasks' references to the shared encoder are stored once, under ``encoder.``."""
    for key in [k for k in state if k.startswith(f"{prefix}tasks.")]:
        rest = key[len(prefix) + len("tasks."):].split(".", 2)
        if len(rest) > 2 and rest[1] in SHARED:
            del state[key]


def _restore_shared(module: Multitask, state: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Give each task's shared-module keys the shared tensors before loading (they are the same modules)."""
    for key in [k for k in state if k.startswith(tuple(f"{prefix}{s}." for s in SHARED))]:
        for label in module.tasks:
            state[f"{prefix}tasks.{label}.{key[len(prefix):]}"] = state[key]


@hookimpl
def rsslctl_methods() -> list[type]:
    return [Multitask]
