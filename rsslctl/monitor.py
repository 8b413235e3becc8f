"""Everyday SSL diagnostics on frozen features: weighted kNN accuracy and a 2-D embedding plot."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
