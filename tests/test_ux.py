"""Researcher tools: weighted kNN against a naive re-computation, the embedding plot, `rsslctl cite`."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from click.testing import CliRunner

from rsslctl.cli import main
from rsslctl.monitor import embedding_plot, knn_accuracy


def _naive_knn(train, train_labels, test, test_labels, k, tau) -> float:
    correct = 0
    for f, y in zip(test.tolist(), test_labels.tolist()):
        def cos(a, b):
            return sum(x * z for x, z in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(z * z for z in b))
        sims = sorted(((cos(f, t), int(c)) for t, c in zip(train.tolist(), train_labels.tolist()) if c >= 0),
                      reverse=True)[:k]
        votes: dict[int, float] = {}
        for s, c in sims:
            votes[c] = votes.get(c, 0.0) + math.exp(s / tau)
        correct += max(votes, key=votes.get) == y
    return correct / len(test_labels)


def test_knn_accuracy_equals_a_naive_weighted_vote() -> None:
    torch.manual_seed(0)
    train, test = torch.randn(60, 5), torch.randn(25, 5)
    train_labels, test_labels = torch.randint(0, 4, (60,)), torch.randint(0, 4, (25,))
    train_labels[:5] = -1  # unlabeled images never vote
    for k, tau in ((1, 0.07), (7, 0.1), (200, 0.5)):
        assert knn_accuracy(train, train_labels, test, test_labels, k, tau, chunk=8) == \
            _naive_knn(train, train_labels, test, test_labels, k, tau)


def test_knn_is_perfect_on_separated_clusters_and_plot_is_written(tmp_path: Path) -> None:
    centres = torch.eye(3) * 10
    labels = torch.arange(3).repeat_interleave(20)
    feats = centres[labels] + 0.1 * torch.randn(60, 3)
    assert knn_accuracy(feats, labels, feats, labels, k=5) == 1.0
    embedding_plot(feats, labels, ["a", "b", "c"], tmp_path / "e.png", "test")
    assert (tmp_path / "e.png").stat().st_size > 5000


def test_cite_prints_the_bibtex_of_what_the_run_used(tiny_recipe: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cli = CliRunner()
    assert cli.invoke(main, ["pretrain", str(tiny_recipe), "--run-dir", str(run), "--quiet", "--set",
                             "schedule.epochs=1"]).exit_code == 0
    out = cli.invoke(main, ["cite", str(run)]).output
    for key in ("jiang2020acl", "madry2018pgd", "goodfellow2015fgsm", "alpaydin1998digits", "wightman2019timm"):
        assert f"{{{key}," in out
    assert out.count("@inproceedings{madry2018pgd,") == 1  # training and evaluation attack: one entry
