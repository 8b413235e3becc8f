"""Researcher tools: weighted kNN against a naive re-computation, the embedding plot, `rsslctl cite`."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from click.testing import CliRunner
from conftest import assert_same_tensors

from rsslctl.cli import main
from rsslctl.train.monitor import embedding_plot, knn_accuracy


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


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    import os
    import stat
    import subprocess
    import sys
    code = ("import sys, torch; from pathlib import Path; from rsslctl.runtime.checkpoint import save_tensors, "
            "atomic_write_text;"
            "d = Path(sys.argv[1]); save_tensors(d / 'w.safetensors', {'x': torch.zeros(2)}); atomic_write_text(d / "
            "'t.json', '{}')")
    for umask, mode in ((0o002, 0o664), (0o077, 0o600)):
        out = tmp_path / oct(umask)
        out.mkdir()
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, preexec_fn=lambda u=umask: os.umask(u))
        for f in ("w.safetensors", "t.json"):
            assert stat.S_IMODE((out / f).stat().st_mode) == mode, (f, oct(umask))


def test_recipes_ship_inside_the_wheel_and_are_found_by_name(tmp_path: Path) -> None:
    """`recipe list` / `recipe show NAME` work from an installed wheel, not only from a clone."""
    import subprocess
    import sys

    import pytest
    root = Path(__file__).resolve().parents[2]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "whl"), str(root)], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1:]}")
    wheel = next((tmp_path / "whl").glob("rsslctl-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import rsslctl; assert "
            "rsslctl.__file__.startswith(sys.argv[1]);"
            "from rsslctl.cli import main; main(['recipe', 'show', 'quickstart'])")
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert '[method]\nname = "acl"' in out.stdout
    listed = subprocess.run([sys.executable, "-c", code.replace("'show', 'quickstart'", "'list'"), str(target)],
                            capture_output=True, text=True, cwd=tmp_path, env={"COLUMNS": "200", "PATH": ""})
    assert listed.returncode == 0 and "quickstart" in listed.stdout and "cf_amc_ssl" in listed.stdout, listed.stderr


def test_recipe_copy_refuses_to_overwrite(tmp_path: Path) -> None:
    cli = CliRunner()
    assert cli.invoke(main, ["recipe", "copy", "quickstart", str(tmp_path)]).exit_code == 0
    assert (tmp_path / "quickstart.toml").read_text().count("[method]") == 1
    again = cli.invoke(main, ["recipe", "copy", "quickstart", str(tmp_path)])
    assert again.exit_code == 2 and "--force" in again.output


def test_batch_job_logs_tensorboard_csv_and_monitors_leave_training_unchanged(tiny_recipe: Path,
                                                                              tmp_path: Path) -> None:
    """Not a terminal: one plain line per epoch with loss, kNN and probe accuracy; TensorBoard holds the scalars;
    the CSVs hold one row per logged step / epoch; monitoring does not change a single trained weight."""
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rsslctl.runtime.checkpoint import latest_checkpoint, load_checkpoint
    common = [str(tiny_recipe), "--set", "schedule.epochs=2", "--set", "evaluation.epochs=2"]
    watched, plain = tmp_path / "watched", tmp_path / "plain"
    out = subprocess.run([sys.executable, "-m", "rsslctl.cli", "pretrain", *common, "--run-dir", str(watched), "--set",
                          "logging.knn_every=1", "--set", "logging.probe_every=2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2 and "loss" in lines[0] and "knn accuracy" in lines[0] and "probe accuracy" in lines[1]
    events = EventAccumulator(str(watched / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/loss_adv", "epoch/loss", "epoch/knn_accuracy",
            "epoch/probe_accuracy"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(6))
    steps = (watched / "metrics.csv").read_text().splitlines()
    assert steps[0].startswith("step,") and len(steps) == 1 + 6
    assert len((watched / "epochs.csv").read_text().splitlines()) == 1 + 2
    assert CliRunner().invoke(main, ["pretrain", *common, "--run-dir", str(plain), "--quiet"]).exit_code == 0
    a, b = (load_checkpoint(latest_checkpoint(d))[0] for d in (watched, plain))
    assert_same_tensors(a, b)
