"""DynACL++ post-processing (LPAFT, METHODS.md §3.4): pseudo labels → linear probing → pseudo-label TRADES.

1. k-means (10 clusters, as the official code for every dataset) on the backbone features of the evaluated
   encoder, ``normal`` BN route, training images without augmentation;
2. a zero-initialised linear head trained on the pseudo labels over frozen features (10 epochs, SGD lr 0.01);
3. TRADES on the pseudo labels (β 6, PGD-10 without random start, α 2/255, ε 8/255, attack in eval mode),
   encoder + head trained (25 epochs, SGD lr 0.1, wd 1e-4, milestones 10/20, batch 512, random crop + flip),
   through the ``pgd`` route for both terms when the encoder is dual-BN (LPAFT_AFF).

The result is a new run directory (recipe + checkpoint of the whole method with the fine-tuned evaluated
encoder) that ``rsslctl evaluate`` consumes; it is meant for evaluation, not for resuming pretraining.
Differences from the reference: the probe trains on pre-computed features of un-augmented images.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attack import eval_mode, projected_ascent
from .checkpoint import atomic_write_text, save_checkpoint, save_tensors
from .engine import autocast, load_train_split, select_device
from .errors import UserError
from .evaluate import extract_features, train_linear_probe
from .finetune import crop_flip, trades_loss
from .runs import RECIPE_FILE, load_run_recipe, load_trained_method


@dataclasses.dataclass
class PostprocessOptions:
    clusters: int = 10
    probe_epochs: int = 10
    probe_lr: float = 0.01
    epochs: int = 25
    lr: float = 0.1
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = (10, 20)
    batch_size: int = 512
    beta: float = 6.0
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10


def kmeans_labels(features: Tensor, clusters: int, seed: int) -> Tensor:
    from sklearn.cluster import KMeans
    km = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(features.cpu().double().numpy())
    return torch.from_numpy(km.labels_).long()


def trades_step(model: nn.Module, x: Tensor, y: Tensor, o: PostprocessOptions) -> Tensor:
    """TRADES loss on pseudo labels; its PGD on the KL starts at x itself (no random start, as LPAFT)."""
    with eval_mode(model):
        with torch.no_grad():
            p_nat = F.softmax(model(x).float(), dim=1)
        x_adv = projected_ascent(x, x.detach(), lambda xa: F.kl_div(F.log_softmax(model(xa).float(), dim=1), p_nat,
                                                                   reduction="sum"), o.step_size, o.steps, o.eps, "linf")
    return trades_loss(model(x), model(x_adv), y, o.beta)


class _Net(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Linear, route: str) -> None:
        super().__init__()
        self.encoder, self.head, self.route = encoder, head, route

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder.features(x, self.route))


def dynacl_pp(run_dir: Path, out_dir: Path, options: PostprocessOptions = PostprocessOptions(), force: bool = False,
              quiet: bool = True) -> dict[str, Any]:
    """Post-process the newest checkpoint of ``run_dir`` into the new run directory ``out_dir``."""
    run_dir, out_dir, o = Path(run_dir), Path(out_dir), options
    recipe = load_run_recipe(run_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise UserError(f"{out_dir}: the output must be a new run directory, not the source run")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir}: directory already exists; pass --force to replace it or choose another --out")
    device = select_device(recipe.engine.device)
    torch.manual_seed(recipe.run.seed)
    method, ckpt, meta = load_trained_method(run_dir, recipe, device, "post-process")
    encoder = method.eval_encoder()
    train = load_train_split(recipe)
    if len(train) < o.clusters:
        raise UserError(f"{run_dir}: {len(train)} training images cannot form {o.clusters} clusters; lower --clusters")
    route = "pgd" if encoder.dual_bn else "normal"
    prec = recipe.engine.precision

    # 1. pseudo labels from normal-route features; 2. linear probe on them over frozen features
    labels = kmeans_labels(extract_features(encoder, lambda x: encoder.features(x, "normal"), train.images, device, prec),
                           o.clusters, recipe.run.seed)
    feats = extract_features(encoder, lambda x: encoder.features(x, route), train.images, device, prec)
    head = train_linear_probe(feats, labels.to(device), o.clusters, o.probe_epochs, o.probe_lr, o.batch_size,
                              o.weight_decay, recipe.run.seed)

    # 3. pseudo-label TRADES on encoder + head
    net = _Net(encoder, head, route).to(device)
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=o.lr, momentum=0.9, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(o.milestones), 0.1)
    images, y_all = train.images.to(device), labels.to(device)
    bs = min(o.batch_size, len(train))
    g = torch.Generator().manual_seed(recipe.run.seed)
    g_aug = torch.Generator().manual_seed(recipe.run.seed + 1)
    loss = torch.zeros(())
    for _ in range(o.epochs):
        net.train()
        for idx in torch.randperm(len(train), generator=g)[: len(train) // bs * bs].view(-1, bs):
            idx = idx.to(device)
            with autocast(device, prec):
                loss = trades_step(net, crop_flip(images[idx], 4, g_aug), y_all[idx], o)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    encoder.requires_grad_(method.encoder is encoder)  # a key encoder goes back to frozen

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    shutil.copyfile(run_dir / RECIPE_FILE, out_dir / RECIPE_FILE)
    save_tensors(out_dir / "pseudo_labels.safetensors", {"labels": labels})
    info = {"source_run": str(run_dir.resolve()), "source_checkpoint": str(ckpt), "route": route,
            "options": dataclasses.asdict(o), "final_trades_loss": float(loss),
            "cluster_sizes": torch.bincount(labels, minlength=o.clusters).tolist()}
    save_checkpoint(out_dir, int(meta["epoch"]), method, opt, {**{k: meta[k] for k in ("recipe", "plugins") if k in meta},
                                                             "postprocess": {"dynacl_pp": info}}, keep=1)
    atomic_write_text(out_dir / "postprocess.json", json.dumps(info, indent=2))
    return info
