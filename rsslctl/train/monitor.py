"""Everyday SSL diagnostics on frozen features: weighted kNN accuracy and a 2-D embedding plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rsslctl.base.files import atomic_save_figure


@torch.no_grad()
def knn_accuracy(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN on cosine similarity (Wu et al., 2018, as solo-learn and most SSL codebases):
    for each test feature the k most similar training features vote for their class with weight exp(s/τ);
    the class with the largest summed weight is the prediction. Labels < 0 (unlabeled) never vote."""
    keep = train_labels >= 0
    train, train_labels = F.normalize(train[keep].float(), dim=1), train_labels[keep]
    num_classes = int(train_labels.max()) + 1
    k = min(k, len(train))
    correct = torch.zeros((), dtype=torch.long, device=test.device)
    for feats, labels in zip(test.split(chunk), test_labels.split(chunk)):
        sim, idx = (F.normalize(feats.float(), dim=1) @ train.t()).topk(k, dim=1)
        votes = torch.zeros(len(feats), num_classes, device=feats.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == labels).sum()
    return float(correct) / len(test_labels)


def embedding_plot(features: Tensor, labels: Tensor, classes: list[str], path: Path, title: str, seed: int = 0) -> None:
    """t-SNE (scikit-learn) of ``features`` coloured by class, with a legend, written atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    x = F.normalize(features.float(), dim=1).cpu().numpy()
    xy = TSNE(2, init="pca", perplexity=min(30.0, max(2.0, (len(x) - 1) / 3)), random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(6, 5))
    for c in sorted(set(labels.tolist())):
        m = (labels == c).cpu().numpy()
        ax.scatter(xy[m, 0], xy[m, 1], s=6, label=classes[c] if 0 <= c < len(classes) else str(c))
    ax.set_title(f"{title} (t-SNE of {len(x)} test images)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=7, loc="best", ncols=2 if len(classes) > 6 else 1)
    fig.tight_layout()
    atomic_save_figure(fig, path)  # a failed write (disk full) leaves no temporary file


def monitor_splits(recipe: Any, limit: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, labels, test images, labels) for the in-training monitors — the labelled training split (as
    `rsslctl evaluate` uses, not cut to data.limit) and the test split — each cut to ``limit`` (0 = all)."""
    from rsslctl.run.build import load_split
    train, test = load_split(recipe, recipe.data.train_split), load_split(recipe, recipe.data.test_split)
    keep = (train.labels >= 0).nonzero().flatten()
    cut = (lambda n: slice(None)) if not limit else (lambda n: slice(0, min(limit, n)))
    keep = keep[cut(len(keep))]
    return train.images[keep], train.labels[keep], test.images[cut(len(test))], test.labels[cut(len(test))]


def monitor_accuracies(method: Any, train_images: Tensor, train_labels: Tensor, test_images: Tensor,
                       test_labels: Tensor, device: torch.device, precision: str, knn: bool, probe: bool,
                       evaluation: Any) -> dict[str, float]:
    """kNN and/or linear-probe test accuracy of the method's evaluation features (the route `evaluate` uses); the
    training run's random streams are left untouched."""
    if not len(train_labels):
        return {}
    route = evaluation.route if evaluation.route != "auto" else ("pgd" if method.eval_encoder().dual_bn else "normal")
    def features(x: Tensor) -> Tensor:
        return method.eval_features(x, route)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _accuracies(method, features, train_images, train_labels, test_images, test_labels, device, precision,
                           knn, probe, evaluation)


def _accuracies(method: Any, features: Any, train_images: Tensor, train_labels: Tensor, test_images: Tensor,
                test_labels: Tensor, device: torch.device, precision: str, knn: bool, probe: bool,
                evaluation: Any) -> dict[str, float]:
    from rsslctl.train.classify import extract_features, train_linear_probe
    train = extract_features(method, features, train_images, device, precision)
    test = extract_features(method, features, test_images, device, precision)
    y_train, y_test = train_labels.to(device), test_labels.to(device)
    out = {}
    if knn:
        out["knn_accuracy"] = knn_accuracy(train, y_train, test, y_test, evaluation.knn_k, evaluation.knn_temperature)
    if probe:
        with torch.enable_grad():
            head = train_linear_probe(train, y_train, int(y_train.max()) + 1, evaluation.epochs, evaluation.lr,
                                      evaluation.batch_size, evaluation.weight_decay, 0)
        with torch.no_grad():
            out["probe_accuracy"] = float((head(test).argmax(1) == y_test).float().mean())
    return out
