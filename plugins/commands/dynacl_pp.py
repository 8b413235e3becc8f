"""DynACL++ post-processing (LPAFT; Luo, Wang, Wang, ICLR 2023): pseudo labels → linear probing → pseudo-label TRADES.

1. k-means (10 clusters, as the official code for every dataset) on the backbone features of the evaluated
   encoder, ``normal`` BN route, training images without augmentation;
2. a zero-initialised linear head trained on the pseudo labels over frozen features (10 epochs, SGD lr 0.01);
3. TRADES on the pseudo labels (β 6, PGD-10 without random start, α 2/255, ε 8/255, attack in eval mode),
   encoder + head trained (25 epochs, SGD lr 0.1, wd 1e-4, milestones 10/20, batch 512, random crop + flip),
   through the ``pgd`` route for both terms when the encoder is dual-BN (LPAFT_AFF).

The result is a new run directory (recipe + checkpoint of the whole method with the fine-tuned evaluated
encoder) that ``rsslctl evaluate`` and ``rsslctl finetune`` consume; it is meant for evaluation, not for resuming
pretraining. Its checkpoint names the "++" row of the fine-tuning table. Difference from the reference: the probe
trains on pre-computed features of un-augmented images.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from rsslctl import UserError, console, hookimpl, user_errors

if TYPE_CHECKING:  # torch is imported by the functions that run: `rsslctl dynacl-pp --help` stays instant
    from torch import Tensor

#: fine-tuning row of a post-processed run, by the source run's row
POST_PROCESSED_ROWS = {"DynACL": "DynACL++", "DynACL-AIR": "DynACL-AIR++"}


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
    import torch
    from sklearn.cluster import KMeans
    km = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(features.cpu().double().numpy())
    return torch.from_numpy(km.labels_).long()


def dynacl_pp(run_dir: Path, out_dir: Path,
              options: PostprocessOptions = PostprocessOptions(),  # noqa: B008 - never mutated; part of the API
              force: bool = False, quiet: bool = True) -> dict[str, Any]:
    """Post-process the newest checkpoint of ``run_dir`` into the new run directory ``out_dir``."""
    import torch

    from rsslctl import (
        MARKER,
        RECIPE_FILE,
        Classifier,
        LoopSettings,
        RunLock,
        atomic_write_text,
        check_replaceable,
        crop_flip,
        extract_features,
        load_run_recipe,
        load_train_split,
        load_trained_method,
        refuse_existing,
        save_checkpoint,
        save_tensors,
        setup_device,
        trades_adversary,
        trades_loss,
        train_classifier,
        train_linear_probe,
    )
    run_dir, out_dir, o = Path(run_dir), Path(out_dir), options
    recipe = load_run_recipe(run_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise UserError(f"{out_dir}: the output must be a new run directory, not the source run")
    refuse_existing(out_dir, "directory", force, " or choose another --out")
    check_replaceable(out_dir, [run_dir])  # --force replaces only a run directory, never the source or a parent
    device = setup_device(recipe)
    torch.manual_seed(recipe.run.seed)
    method, ckpt, meta = load_trained_method(run_dir, recipe, device, "post-process")
    encoder = method.eval_encoder()
    train = load_train_split(recipe)
    if len(train) < o.clusters:
        raise UserError(f"{run_dir}: {len(train)} training images cannot form {o.clusters} clusters; lower --clusters")
    route = "pgd" if encoder.dual_bn else "normal"
    prec = recipe.engine.precision

    # 1. pseudo labels from normal-route features; 2. linear probe on them over frozen features
    labels = kmeans_labels(extract_features(encoder, lambda x: encoder.features(x, "normal"), train.images, device,
                                            prec),
                           o.clusters, recipe.run.seed)
    feats = extract_features(encoder, lambda x: encoder.features(x, route), train.images, device, prec)
    net = Classifier(encoder, encoder.features, feats.shape[1], o.clusters, route).to(device)
    net.head = train_linear_probe(feats, labels.to(device), o.clusters, o.probe_epochs, o.probe_lr, o.batch_size,
                                  o.weight_decay, recipe.run.seed)

    # 3. pseudo-label TRADES on encoder + head, both terms through ``route``
    def step_loss(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_adv = trades_adversary(net, x, route, o.eps, o.step_size, o.steps, random_start=False)
        logits = net(x)
        return trades_loss(logits, net(x_adv), y, o.beta), logits

    net.requires_grad_(True)
    settings = LoopSettings(o.epochs, min(o.batch_size, len(train)), o.lr, o.weight_decay, milestones=o.milestones,
                            drop_last=True, seed=recipe.run.seed)
    summary = train_classifier(list(net.parameters()), train.images.to(device), labels.to(device), step_loss, settings,
                               device, prec, prepare=lambda x, g: crop_flip(x, 4, g), on_epoch_start=net.train,
                               title="dynacl-pp", quiet=quiet)
    encoder.requires_grad_(method.encoder is encoder)  # a key encoder goes back to frozen

    check_replaceable(out_dir, [run_dir])
    if out_dir.exists():
        with RunLock(out_dir, "being replaced by dynacl-pp"):  # not while another process writes it
            shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / MARKER).write_text('{"format": "rsslctl-run/1"}\n')
    shutil.copyfile(run_dir / RECIPE_FILE, out_dir / RECIPE_FILE)
    save_tensors(out_dir / "pseudo_labels.safetensors", {"labels": labels})
    row = method.finetune_row()
    info = {"source_run": str(run_dir.resolve()), "source_checkpoint": str(ckpt), "route": route,
            "options": dataclasses.asdict(o), "final_trades_loss": summary["loss"],
            "cluster_sizes": torch.bincount(labels, minlength=o.clusters).tolist()}
    optimizer = torch.optim.SGD(method.parameters(), lr=o.lr)  # a placeholder: post-processed runs do not resume
    save_checkpoint(out_dir, int(meta["epoch"]), method, optimizer,
                    {**{k: meta[k] for k in ("recipe", "plugins") if k in meta}, "postprocess": {"dynacl_pp": info},
                     "finetune_row": POST_PROCESSED_ROWS.get(row, row)}, keep=1)
    atomic_write_text(out_dir / "postprocess.json", json.dumps(info, indent=2))
    return info


@click.command("dynacl-pp")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New run directory for the post-processed encoder (evaluate it with `rsslctl evaluate`).")
@click.option("--clusters", default=10, show_default=True, help="k-means clusters for the pseudo labels.")
@click.option("--probe-epochs", default=10, show_default=True, help="Linear probing epochs on pseudo labels.")
@click.option("--epochs", default=25, show_default=True, help="Pseudo-label TRADES epochs.")
@click.option("--batch-size", default=512, show_default=True, help="Batch size of both stages.")
@click.option("--steps", default=10, show_default=True, help="PGD steps of the TRADES attack.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@user_errors
def dynacl_pp_command(run_dir: Path, out_dir: Path, clusters: int, probe_epochs: int, epochs: int, batch_size: int,
                      steps: int, force: bool) -> None:
    """DynACL++ post-processing of RUN_DIR: k-means pseudo labels, linear probing, pseudo-label TRADES."""
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    for name, value in (("--clusters", clusters), ("--probe-epochs", probe_epochs), ("--epochs", epochs),
                        ("--batch-size", batch_size), ("--steps", steps)):
        if value < 1 or (name == "--clusters" and value < 2):
            raise UserError(f"{name} = {value}: must be at least {2 if name == '--clusters' else 1}")
    info = dynacl_pp(run_dir, out_dir, PostprocessOptions(clusters=clusters, probe_epochs=probe_epochs, epochs=epochs,
                                                          batch_size=batch_size, steps=steps), force)
    console.print(f"wrote {out_dir} (pseudo-label cluster sizes {info['cluster_sizes']}); "
                  f"evaluate with `rsslctl evaluate {out_dir}`")


@hookimpl
def rsslctl_commands() -> list:
    return [dynacl_pp_command]
