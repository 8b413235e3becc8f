"""Supervised adversarial training (SAT) and the pretext tasks of the transfer-learning seed: rotation and jigsaw.

Each trains a classification head owned by the method (checkpointed with it) on the encoder features,
with labels (SAT) or self-generated labels (rotation: 0/90/180/270°, jigsaw: tile permutation index).
With an [attack] table the task is trained adversarially (PGD-AT on the task's cross-entropy, attack in
eval mode); SAT always is. The heads sit on the backbone features (``encoder.features``), never on the Encoder's
projection head, so a multi-task recipe can combine them with a method that trains that head; the single-task
recipes set ``encoder.head_layers = 0``.
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsslctl import Attack, CoresetTarget, Encoder, Method, UserError, eval_mode, fp32, hookimpl
from rsslctl_plugins.methods.options import CITATION, JigsawOptions, SATOptions


class ClassificationTask(Method):
    """Base: ``task(views, labels) -> (inputs, targets)``; cross-entropy of a linear head, PGD-AT if an attack is
    set."""

    num_outputs = 0
    uses_projection_head = False

    def __init__(self, options, encoder: Encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        self.classifier = nn.Linear(encoder.num_features, self.num_outputs)

    def logits(self, x: Tensor) -> Tensor:
        return self.classifier(self.encoder.features(x))

    def task(self, views: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = self.task(self.augment(images), labels)
        if self.attack is not None:
            with eval_mode(self):
                x = self.attack.perturb(x, lambda xa: F.cross_entropy(self.logits(xa).float(), y, reduction="sum"))
        logits = self.logits(x).float()
        loss = F.cross_entropy(logits, y)
        return loss, {"task_accuracy": (logits.argmax(1) == y).float().mean().detach()}


class ClassifierTarget(CoresetTarget):
    """Supervised adversarial training (SAT-RCS): the classifier's last linear layer; training loss = CE on PGD
    examples (maximising CE); RD between the logits of natural and adversarial inputs."""

    def __init__(self, features: Callable[[Tensor], Tensor], last: nn.Linear, attack: Attack,
                 modules: list[nn.Module], augment: Callable[[Tensor], Tensor] | None = None) -> None:
        self._features, self.last, self.attack, self._modules = features, last, attack, modules
        self.augment = augment

    def modules(self) -> list[nn.Module]:
        return self._modules

    def layers(self) -> list[nn.Linear]:
        return [self.last]

    def features(self, x: Tensor, route: str) -> Tensor:
        return self._features(x)

    def head(self, f: Tensor, route: str) -> Tensor:
        return self.last(f)

    def training_losses(self, images: Tensor, labels: Tensor) -> Tensor:
        x = self.augment(images) if self.augment else images.float() / 255
        adv = self.attack.perturb(x, lambda xa: F.cross_entropy(self.outputs(xa, "normal").float(), labels,
                                                                reduction="sum"))
        with torch.no_grad():
            f = self.features(adv, "normal").float()
        with fp32(f):
            return F.cross_entropy(self.head(f, "normal").float(), labels, reduction="none")


class SAT(ClassificationTask):
    """Supervised adversarial training (Madry et al.): PGD-AT with the true labels."""

    name = "sat"
    citation = CITATION["sat"]
    Options = SATOptions
    needs_attack = True

    def __init__(self, options: SATOptions, encoder: Encoder, attack, augment) -> None:
        self.num_outputs = options.num_classes
        super().__init__(options, encoder, attack, augment)

    def task(self, views: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return views, labels

    def coreset_target(self) -> ClassifierTarget:
        """SAT-RCS: gradients of the classifier's last layer, RD on the logits."""
        return ClassifierTarget(self.encoder.features, self.classifier, self.attack, [self], self.augment)


class Rotation(ClassificationTask):
    """Rotation prediction (Gidaris et al., 2018): every image in all four rotations, 4-way classification."""

    name = "rotation"
    citation = CITATION["rotation"]
    num_outputs = 4

    def task(self, views: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([torch.rot90(views, k, dims=(2, 3)) for k in range(4)])
        y = torch.arange(4, device=views.device).repeat_interleave(views.shape[0])
        return x, y


def permutation_set(tiles: int, count: int, seed: int = 0) -> Tensor:
    """``count`` distinct permutations of ``tiles`` tiles: all of them when few, else a seeded random choice."""
    if count <= 720 and tiles <= 6:
        perms = torch.tensor(list(itertools.permutations(range(tiles))))
        if count >= len(perms):
            return perms
        return perms[torch.randperm(len(perms), generator=torch.Generator().manual_seed(seed))[:count]]
    g = torch.Generator().manual_seed(seed)
    chosen: dict[tuple[int, ...], None] = {}
    while len(chosen) < count:
        chosen[tuple(torch.randperm(tiles, generator=g).tolist())] = None
    return torch.tensor(list(chosen))


class Jigsaw(ClassificationTask):
    """Jigsaw (Noroozi & Favaro, 2016): shuffle a grid×grid tiling by one of a fixed set of permutations,
    classify which permutation was applied."""

    name = "jigsaw"
    citation = CITATION["jigsaw"]
    Options = JigsawOptions

    def __init__(self, options: JigsawOptions, encoder: Encoder, attack, augment) -> None:
        tiles = options.grid ** 2
        perms = permutation_set(tiles, options.permutations)
        self.num_outputs = len(perms)
        super().__init__(options, encoder, attack, augment)
        self.register_buffer("perms", perms, persistent=False)

    def task(self, views: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = views.shape
        g = self.options.grid
        if h % g or w % g:
            raise UserError(f"method.grid = {g} does not divide the {h}×{w} images; set data.image_size to a multiple")
        y = torch.randint(len(self.perms), (n,)).to(views.device, non_blocking=True)
        tiles = views.view(n, c, g, h // g, g, w // g).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c, h // g, w // g)
        order = self.perms[y]  # [n, tiles]: output tile t takes input tile order[t]
        shuffled = tiles[torch.arange(n, device=views.device)[:, None], order]
        x = shuffled.view(n, g, g, c, h // g, w // g).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
        return x.contiguous(), y


@hookimpl
def rsslctl_methods() -> list[type]:
    return [SAT, Rotation, Jigsaw]
