"""Basic evaluation: linear probe on frozen features, then clean and PGD accuracy of encoder + probe."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import registry
from .checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint
from .method import Method
from .engine import autocast, build_method, load_split, select_device
from .errors import UserError
from .options import validate
from .recipe import Recipe
from .runs import load_run_recipe


class Classifier(nn.Module):
    """Frozen method features (one BN route) followed by a linear head; takes pixels in [0, 1]."""

    def __init__(self, method: Method, head: nn.Linear, route: str) -> None:
        super().__init__()
        self.method, self.head, self.route = method, head, route

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.method.eval_features(x, self.route).float())


@torch.no_grad()
def extract_features(method: Method, images: Tensor, route: str, device: torch.device, precision: str,
                     batch: int = 512) -> Tensor:
    method.eval()
    out = []
    for chunk in images.split(batch):
        with autocast(device, precision):
            out.append(method.eval_features(chunk.to(device).float().div_(255), route).float())
    return torch.cat(out)


def train_linear_probe(features: Tensor, labels: Tensor, num_classes: int, epochs: int, lr: float, batch_size: int,
                       weight_decay: float, seed: int) -> nn.Linear:
    """SLF-style probe: zero-initialised linear layer, SGD momentum 0.9, cosine LR, clean CE."""
    head = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = features.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch_size):
            idx = idx.to(features.device)
            loss = F.cross_entropy(head(features[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, device: torch.device, attack: Any = None,
             batch: int = 256) -> float:
    """Top-1 accuracy in eval mode; with ``attack``, on its adversarial examples (CE objective)."""
    model.eval()
    correct = 0
    for xb, yb in zip(images.split(batch), labels.split(batch)):
        x, y = xb.to(device).float().div_(255), yb.to(device)
        if attack is not None:
            x = attack.perturb(x, lambda xa: F.cross_entropy(model(xa), y, reduction="sum"))
        with torch.no_grad():
            correct += (model(x).argmax(1) == y).sum()
    return float(correct) / len(labels)


def evaluate_run(run_dir: Path, overrides: list[str] = (), quiet: bool = False) -> dict[str, Any]:
    """Linear probe + clean/robust accuracy of the newest checkpoint of ``run_dir``; writes eval.json."""
    run_dir = Path(run_dir)
    recipe: Recipe = load_run_recipe(run_dir, overrides)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir}: no checkpoint to evaluate yet; run `rsslctl pretrain` first")
    device = select_device(recipe.engine.device)
    torch.manual_seed(recipe.run.seed)
    method = build_method(recipe, device)
    model_state, _, meta = load_checkpoint(ckpt)
    method.load_state_dict(model_state)
    encoder = method.eval_encoder()
    ev = recipe.evaluation
    route = ("pgd" if encoder.dual_bn else "normal") if ev.route == "auto" else ev.route
    train, test = load_split(recipe, recipe.data.train_split), load_split(recipe, recipe.data.test_split)
    if (train.labels < 0).all():
        raise UserError(f"data.train_split = '{recipe.data.train_split}' has no labels; set data.train_split to a labelled split")
    if ev.limit:
        test = test.subset(torch.arange(min(ev.limit, len(test))))
    for p in method.parameters():
        p.requires_grad_(False)
    feats = extract_features(method, train.images, route, device, recipe.engine.precision)
    num_classes = len(train.classes)
    head = train_linear_probe(feats, train.labels.to(device), num_classes, ev.epochs, ev.lr, ev.batch_size,
                              ev.weight_decay, recipe.run.seed)
    model = Classifier(method, head, route)
    attack_cls = registry.get("attack", ev.attack, "evaluation.attack")
    keys = {f.name for f in dataclasses.fields(attack_cls.Options)}
    attack = attack_cls(validate(attack_cls.Options, {k: getattr(ev, k) for k in ("eps", "step_size", "steps") if k in keys},
                                 "evaluation"))
    torch.manual_seed(recipe.run.seed)
    clean = accuracy(model, test.images, test.labels, device)
    robust = accuracy(model, test.images, test.labels, device, attack)
    result = {"checkpoint": str(ckpt), "epoch": meta["epoch"], "protocol": "linear probe on frozen features (SLF-style)",
              "route": route, "test_images": len(test), "clean_accuracy": clean, "robust_accuracy": robust,
              "attack": {"name": ev.attack, "eps": ev.eps, "step_size": ev.step_size, "steps": ev.steps},
              "probe": {"epochs": ev.epochs, "lr": ev.lr, "batch_size": ev.batch_size}}
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    return result
