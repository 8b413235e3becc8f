"""One rank of the multi-process tests in test_distributed.py (run as a script, with torchrun's environment variables
set by the test, or alone for the single-process reference).

    python ddp_worker.py step RECIPE OUT [--set k=v ...]       one training step on fixed views; saves what it saw
    python ddp_worker.py train RECIPE RUN_DIR KILL_AT [--set ...]  pretrain; SIGKILL itself after optimizer step KILL_AT
    python ddp_worker.py coreset RECIPE OUT [--set ...]         one RCS selection on the untrained model
    python ddp_worker.py losses OUT                              contrastive losses of fixed embeddings, and their
                                                                 gradients
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from rsslctl.adversary import attack
from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load
from rsslctl.runtime import distributed as dist
from rsslctl.train.engine import Trainer


class FixedViews(nn.Module):
    """Stands in for the augmentation: this rank's rows of fixed global views (``multi_view`` interleaves each image's
    views, and a rank's images are a contiguous slice of the global batch, so its views are a contiguous slice too)."""

    def __init__(self, views: Tensor) -> None:
        super().__init__()
        self.views = views

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[0] * dist.world_size() == self.views.shape[0], (x.shape, self.views.shape)
        return dist.shard(self.views).clone()


def step(recipe_path: str, out: str, sets: list[str]) -> None:
    recipe = load(Path(recipe_path), sets)
    trainer = Trainer(recipe, Path(out) / "run", quiet=True)
    g = torch.Generator().manual_seed(0)
    bs = recipe.schedule.batch_size
    batch = torch.randperm(len(trainer.train), generator=g)[:bs]
    images, labels = trainer.train.images[batch], trainer.train.labels[batch]
    size = recipe.data.image_size
    views = torch.rand(2 * bs, images.shape[1], size, size, generator=g)
    trainer.method.augment = FixedViews(views)
    seen: list[Tensor] = []
    perturb = trainer.method.attack.perturb
    trainer.method.attack.perturb = lambda x, objective: seen.append(perturb(x, objective)) or seen[-1]
    grads: list[Tensor] = []  # the input gradient of every attack step
    loss_and_grad = attack.loss_and_grad

    def recorded(objective: Callable[[Tensor], Tensor], leaf: Tensor) -> tuple[Tensor, Tensor]:
        out = loss_and_grad(objective, leaf)
        grads.append(out[1].detach().clone())
        return out
    attack.loss_and_grad = recorded  # restored below: the test process also runs this in-process as its reference
    trainer.method.train()
    try:
        _, _, loss, _ = trainer._step(1, 0, 0, dist.shard(images), dist.shard(labels))
    finally:
        attack.loss_and_grad = loss_and_grad
    loss = dist.mean_across_ranks(loss)
    state = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    torch.save({"loss": loss, "adv": seen[0].detach(), "grads": grads, "state": state},
               Path(out) / f"rank{dist.rank()}.pt")
    dist.shutdown()


def train(recipe_path: str, run_dir: str, kill_at: int, sets: list[str]) -> None:
    recipe = load(Path(recipe_path), sets)

    def hook(step: int) -> None:
        if step == kill_at:  # every rank dies after the same step's collectives
            os.kill(os.getpid(), signal.SIGKILL)
    trainer = Trainer(recipe, Path(run_dir), quiet=True, on_step=hook)
    dist.rank0_does(lambda: prepare_run_dir(recipe, Path(run_dir), False))
    trainer.fit()
    dist.shutdown()


def coreset(recipe_path: str, out: str, sets: list[str]) -> None:
    from rsslctl.method.coreset import SelectionContext, run_selector
    recipe = load(Path(recipe_path), sets)
    trainer = Trainer(recipe, Path(out) / "run", quiet=True)
    run = trainer.coreset
    images, labels = trainer.train.images, trainer.train.labels
    context = SelectionContext(images, labels, run.pool, run.validation, trainer.batch_size, 11, trainer.method)
    picked = run_selector(run.selector, context, run.budget)
    if dist.is_main():
        torch.save(picked, Path(out) / "picked.pt")
    dist.shutdown()


def losses(out: str) -> None:
    """Every contrastive loss built on ``losses.global_similarities`` on this rank's rows of fixed global embeddings:
    the mean over ranks of the losses, and the gradient of that mean with respect to this rank's rows; then a negative
    queue after one push of this rank's rows, and a learnable bank's direction after this rank records its own."""
    from rsslctl.nn.losses import nt_xent
    from rsslctl_plugins.methods.hcl import hcl_loss
    from rsslctl_plugins.methods.ifm import ifm_nt_xent
    dist.setup("cpu")
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))  # 8 images × 2 views, interleaved
    result = {}
    for name, fn in (("nt_xent", nt_xent), ("hcl", lambda v: hcl_loss(v, 0.5, 1.0, 0.1)),
                     ("ifm", lambda v: ifm_nt_xent(v, 0.5, 0.1))):
        mine = dist.shard(z).clone().requires_grad_(True)
        with dist.data_parallel_step():
            loss = fn(mine)
        (loss / dist.world_size()).backward()  # the engine averages gradients over ranks
        result[name] = (dist.mean_across_ranks(loss.detach()), mine.grad)
    from rsslctl.method.memory import LearnableBank, NegativeQueue  # the memory: every rank holds the global batch's
    torch.manual_seed(1)
    queue, bank = NegativeQueue(24, 8), LearnableBank(12, 8, lr=1.0)
    with dist.data_parallel_step():
        queue.push(dist.shard(z))
        bank.record(torch.randn(12, 8, generator=torch.Generator().manual_seed(2 + dist.rank())))
    result["queue"] = (queue.ptr.clone(), queue.keys.clone())
    result["bank_direction"] = bank.direction.clone()
    torch.save(result, Path(out) / f"losses{dist.rank()}.pt")
    dist.shutdown()


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    sets = [a for a in rest if "=" in a]
    rest = [a for a in rest if "=" not in a]
    if mode == "step":
        step(rest[0], rest[1], sets)
    elif mode == "train":
        train(rest[0], rest[1], int(rest[2]), sets)
    elif mode == "coreset":
        coreset(rest[0], rest[1], sets)
    elif mode == "losses":
        losses(rest[0])
