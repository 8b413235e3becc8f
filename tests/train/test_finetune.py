"""Fine-tuning (SLF / ALF / AFF) and the evaluation suite, on tiny models and data (CPU, seconds)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import TinyLinear, run
from conftest import assert_same_tensors
from torch import nn

from rsslctl.adversary.attack import make_attack
from rsslctl.base import registry
from rsslctl.base.errors import UserError
from rsslctl.cli import finetune as ft
from rsslctl.data import corruptions as C
from rsslctl.eval.suite import SuiteOptions, autoattack_accuracy, corruption_accuracy
from rsslctl.nn.encoder import collapse_bn_state
from rsslctl.run.build import build_method, load_split
from rsslctl.run.recipe import load, resolve
from rsslctl.train.classify import (
    MODES,
    accuracy,
    balanced_subset,
    crop_flip,
    resolve_config,
    resolve_configs,
    trades_adversary,
    trades_loss,
)

CPU = torch.device("cpu")


def column(dataset: str, size: int) -> str:
    """The table column the dataset plugin declares ('' = none of its own)."""
    return registry.get("dataset", dataset).hyperparameter_column(size)


def config(mode: str, row: str, dataset: str, size: int, user: dict | None = None):
    return resolve_config(mode, ft.finetune_rows(), row, column(dataset, size), user or {})


# -- configuration ------------------------------------------------------------------------------------------------


def test_all_resolves_each_mode_exactly_as_alone_without_leakage() -> None:
    user = {"seed": 3, "beta": None}
    rows = ft.finetune_rows()
    together = resolve_configs("ALL", rows, "DynACL-AIR", column("cifar10", 32), user)
    alone = tuple(resolve_configs(m, rows, "DynACL-AIR", column("cifar10", 32), user)[0] for m in MODES)
    assert together == alone
    slf, alf, aff = together
    # the reference mutates args in place: SLF's epochs = 5 leaks into ALF and AFF there, not here
    assert (slf.epochs, alf.epochs, aff.epochs) == (5, 25, 25)
    assert (slf.batch_size, slf.lr, slf.milestones) == (512, 0.01, (10, 20))
    assert (aff.batch_size, aff.lr, aff.milestones, aff.beta) == (128, 0.1, (15, 20), 6.0)
    assert all(c.seed == 3 for c in together)
    with pytest.raises(dataclasses.FrozenInstanceError):
        slf.epochs = 7  # type: ignore[misc]


@pytest.mark.parametrize("row, mode, data, size, expect", [
    ("ACL", "AFF", "cifar10", 32, (128, 0.1, (40, 60), 100)),
    ("ACL", "SLF", "cifar100", 32, (512, 0.05, (10, 20), 25)),
    ("ACL", "ALF", "stl10", 32, (128, 0.01, (10, 20), 25)),
    ("DynACL", "AFF", "stl10", 96, (128, 0.1, (10, 20), 25)),
    ("DynACL-AIR++", "ALF", "cifar10", 32, (512, 0.01, (10, 20), 4)),
    ("other", "SLF", "cifar10", 32, (128, 0.1, (15, 20), 25)),
])
def test_per_method_table(row: str, mode: str, data: str, size: int, expect: tuple) -> None:
    c = config(mode, row, data, size)
    assert (c.batch_size, c.lr, c.milestones, c.epochs) == expect


def test_user_values_override_the_table_and_bad_values_are_user_errors() -> None:
    c = config("AFF", "ACL", "cifar10", 32, {"epochs": 2, "lr": 0.5, "milestones": [1]})
    assert (c.epochs, c.lr, c.milestones, c.batch_size) == (2, 0.5, (1,), 128)
    with pytest.raises(UserError, match="label-fraction"):
        config("SLF", "ACL", "cifar10", 32, {"label_fraction": 1.5})
    with pytest.raises(UserError, match="unknown row"):
        config("SLF", "SimCLR", "cifar10", 32)


# -- data ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.3, 1.0])
def test_label_fractions_are_exact_balanced_and_seeded(fraction: float) -> None:
    labels = torch.arange(10).repeat_interleave(torch.tensor([100, 100, 100, 100, 100, 100, 100, 100, 100, 97]))
    idx = balanced_subset(labels, fraction, seed=1)
    assert len(idx) == round(fraction * len(labels)) and len(idx.unique()) == len(idx)
    counts = torch.bincount(labels[idx], minlength=10).double()
    per_class = torch.bincount(labels, minlength=10).double() * fraction
    assert ((counts - per_class).abs() < 1).all()  # ⌊f·n_c⌋ or ⌈f·n_c⌉ per class
    assert torch.equal(idx, balanced_subset(labels, fraction, seed=1))
    if fraction < 1:
        assert not torch.equal(idx, balanced_subset(labels, fraction, seed=2))


def test_crop_flip_is_a_padded_window_or_its_mirror() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = crop_flip(x, 2, g)
    padded = F.pad(x.float() / 255, (2, 2, 2, 2))
    for i in range(len(x)):
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    unflipped = crop_flip(x, 0, torch.Generator().manual_seed(1))
    flipped = [torch.equal(unflipped[i], x[i].float().flip(2) / 255) for i in range(len(x))]
    assert all(torch.equal(unflipped[i], x[i].float() / 255) or flipped[i] for i in range(len(x))) and any(flipped)


# -- training -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ft.Pretrained, torch.Tensor, torch.Tensor]:
    """A dual-BN tiny encoder (untrained weights with distinct BN routes) and 64 digits at 16 px."""
    from conftest import TINY
    path = tmp_path_factory.mktemp("ft") / "tiny.toml"
    path.write_text(TINY)
    recipe = load(path)
    torch.manual_seed(0)
    enc = build_method(recipe, CPU).encoder
    with torch.no_grad():  # make the two BN routes differ, so picking the wrong one shows
        for name, p in enc.backbone.named_parameters():
            if ".bn_list.1." in name:
                p.add_(0.1 * torch.randn_like(p))
    bb = recipe.resolved["backbone"]
    src = ft.Pretrained({"name": "timm", "options": {k: v for k, v in bb.items() if k != "name"}},
                        {k: v.clone() for k, v in enc.backbone.state_dict().items()}, True,
                        tuple(recipe.encoder.mean), tuple(recipe.encoder.std), "ACL", {}, "test")
    data = load_split(recipe, "train")
    return src, data.images[:64], data.labels[:64]


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module: nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("mode", ["SLF", "ALF"])
def test_linear_modes_change_only_the_head(pretrained, mode: str) -> None:
    src, x, y = pretrained
    net = src.net(10, dual=False)
    before = _snapshot(net)
    cfg = config(mode, "other", "digits", 16, {"epochs": 1, "batch_size": 32, "train_steps": 2})
    summary = ft.train(cfg, net, x, y, CPU)
    assert _changed(before, net) == {"head.weight", "head.bias"}  # BN running stats untouched: encoder in eval mode
    assert summary["epoch"] == 1 and np.isfinite(summary["loss"])


def test_aff_dual_bn_starts_from_both_routes_and_trains_everything(pretrained) -> None:
    src, x, y = pretrained
    net = src.net(10, dual=True)
    assert net.body.dual_bn
    assert_same_tensors(net.body.backbone.state_dict(), src.state)
    single = src.net(10, dual=False)  # SLF/ALF/eval start from the pgd route
    pgd = collapse_bn_state(src.state, "pgd")
    assert_same_tensors(single.body.backbone.state_dict(), pgd)
    before = _snapshot(net)
    cfg = config("AFF", "other", "digits", 16, {"epochs": 1, "batch_size": 32, "train_steps": 1})
    ft.train(cfg, net, x, y, CPU)
    changed = _changed(before, net)
    assert {"head.weight", "body.backbone.conv1.weight"} <= changed
    assert any(".bn_list.0.weight" in k for k in changed) and any(".bn_list.1.weight" in k for k in changed)


def test_mismatched_weights_are_an_error_naming_the_keys(pretrained) -> None:
    src, _, _ = pretrained
    broken = dataclasses.replace(src, state={k: v for k, v in src.state.items() if "layer4" not in k})
    with pytest.raises(UserError, match=r"missing .*layer4"):
        broken.net(10, dual=True)
    single = dataclasses.replace(src, state=collapse_bn_state(src.state, "pgd"), dual_bn=False)
    with pytest.raises(UserError, match="unexpected"):  # dual-BN keys into a single-BN net: no silent drop
        dataclasses.replace(single, state=src.state).net(10, dual=False)


def test_trades_loss_matches_formula() -> None:
    torch.manual_seed(0)
    nat, adv, y = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    p, q = nat.softmax(1), adv.softmax(1)
    kl = sum(float((p[i] * (p[i].log() - q[i].log())).sum()) for i in range(5)) / 5
    ce = -sum(float(nat.log_softmax(1)[i, y[i]]) for i in range(5)) / 5
    assert float(trades_loss(nat, adv, y, 6.0)) == pytest.approx(ce + 6 * kl, rel=1e-5)


def test_pgd_accuracy_not_above_clean_and_trades_adversary_in_ball(pretrained) -> None:
    src, x, y = pretrained
    net = src.net(10, dual=False)
    cfg = config("SLF", "other", "digits", 16, {"epochs": 15, "batch_size": 16, "lr": 0.5, "crop_padding": 0,
                                                "weight_decay": 0.0})
    ft.train(cfg, net, x, y, CPU)
    net.eval()
    clean = accuracy(net, x, y, CPU)
    torch.manual_seed(0)
    robust = accuracy(net, x, y, CPU, make_attack("pgd", eps=8 / 255, step_size=2 / 255, steps=3))
    assert clean > 0.2 and robust <= clean, (clean, robust)  # chance is 0.1
    xf = x[:8].float() / 255
    adv = trades_adversary(net, xf, "pgd", cfg.eps, cfg.step_size, 2)
    assert (adv - xf).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1


# -- AutoAttack and corruptions -----------------------------------------------------------------------------------


def test_autoattack_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    model = TinyLinear().eval()
    torch.manual_seed(1)
    x = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        y = model(x.float() / 255).argmax(1)  # all correct at first: the attack has work to do
    opts = SuiteOptions(autoattack=True, aa_version="custom", aa_attacks=("apgd-ce",), aa_limit=8, eps=8 / 255)
    state = tmp_path / "aa.json"
    res = autoattack_accuracy(model, x, y, opts, CPU, state)
    assert res["images"] == 8 and res["clean_accuracy"] == 1.0
    assert 0 <= res["robust_accuracy"] < 1.0 and res["max_perturbation"] <= 8 / 255 + 1e-6
    assert res["attacks"] == ["apgd-ce"] and state.is_file()
    again = autoattack_accuracy(model, x, y, opts, CPU, state)  # resumed: nothing left to run, same result
    assert again["robust_accuracy"] == res["robust_accuracy"]
    saved = json.loads(state.read_text())
    state.write_text(json.dumps({**saved, "robust": [True] * 8}))  # finished attacks are never re-run
    assert autoattack_accuracy(model, x, y, opts, CPU, state)["robust_accuracy"] == 1.0
    standard = autoattack_accuracy(model, x, y, SuiteOptions(autoattack=True, aa_limit=8), CPU, tmp_path / "std.json")
    assert standard["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert standard["robust_accuracy"] <= res["robust_accuracy"]
    with pytest.raises(UserError, match="--aa-attacks"):
        autoattack_accuracy(model, x, y, dataclasses.replace(opts, aa_attacks=()), CPU, tmp_path / "b.json")


def _fake_cifar_c(folder: Path, per: int = 5) -> None:
    """Real layout: <name>.npy uint8 [5·per, H, W, 3] (severities stacked) and labels.npy [5·per]."""
    folder.mkdir(parents=True)
    labels = np.concatenate([[0] * s + [1] * (per - s) for s in C.SEVERITIES]).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    for k, name in enumerate(C.CORRUPTIONS):
        data = np.zeros((5 * per, 4, 4, 3), dtype=np.uint8)
        data[..., 0] = k  # channel 0 tags the corruption; channel 2 tags the row
        data[..., 2] = np.arange(5 * per)[:, None, None]
        np.save(folder / f"{name}.npy", data)


class _AlwaysZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[1.0] + [0.0] * 9]).expand(len(x), 10)


def test_corruption_reader_handles_the_real_layout(tmp_path: Path) -> None:
    folder = tmp_path / "CIFAR-10-C"
    _fake_cifar_c(folder)
    assert C.corruption_dir(tmp_path, "CIFAR-10-C") == folder
    seen = list(C.read_corruptions(folder))
    assert len(seen) == 15 * 5
    name, s, images, labels = seen[7]  # third corruption, severity 3
    assert (name, s, images.shape) == (C.CORRUPTIONS[1], 3, (5, 3, 4, 4))
    assert images[:, 0].eq(1).all() and images[:, 2, 0, 0].tolist() == [10, 11, 12, 13, 14]
    assert labels.tolist() == [0, 0, 0, 1, 1]
    res = corruption_accuracy(_AlwaysZero(), None, "CIFAR-10-C", tmp_path, SuiteOptions(), CPU)
    assert not res["generated"] and res["per_severity"] == {str(s): pytest.approx(s / 5) for s in C.SEVERITIES}
    assert res["mean"] == pytest.approx(0.6)
    (folder / "fog.npy").unlink()
    with pytest.raises(UserError, match="fog.npy"):
        list(C.read_corruptions(folder))


def test_generated_corruptions_are_labelled_and_grow_with_severity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32) * 0.6 + 0.2
    for name in C.GENERATED:
        dist = [float((C.generate(x, name, s, torch.Generator().manual_seed(0)) - x).abs().mean())
                for s in C.SEVERITIES]
        assert dist[0] < dist[-1], name
        out = C.generate(x, name, 3, torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    from rsslctl.data.dataset import ImageData
    test = ImageData((x * 255).to(torch.uint8), torch.zeros(4, dtype=torch.long), [str(i) for i in range(10)], "t")
    res = corruption_accuracy(_AlwaysZero(), test, "CIFAR-10-C", tmp_path, SuiteOptions(), CPU)
    assert res["generated"] and "generated" in res["source"] and res["mean"] == 1.0


# -- command line -------------------------------------------------------------------------------------------------


def test_finetune_and_evaluate_end_to_end(tiny_recipe: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run("pretrain", str(tiny_recipe), "--run-dir", str(run_dir), "--quiet", "--set",
               "schedule.epochs=1").exit_code == 0
    common = ["--epochs", "1", "--batch-size", "32", "--train-steps", "1", "--pgd-steps", "2", "--test-limit", "32",
              "--eps-curve", "0,8", "--set", "data.limit=64", "--quiet"]
    result = run("finetune", str(run_dir), "--mode", "ALL", "--corruptions", "--corruption-limit", "8", "--json",
                 *common)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    folder = Path(report["folder"])
    assert folder.parent == run_dir / "evaluation" and report == json.loads((folder / "report.json").read_text())
    assert set(report["leaderboard"]) == {"SLF", "ALF", "AFF"}
    for mode, r in report["modes"].items():
        assert r["pgd"]["accuracy"] <= r["clean_accuracy"] and r["test_images"] == 32
        assert r["corruption"]["generated"] and r["leaderboard"]["CA_generated"]
        assert [p["eps"] for p in r["eps_curve"]] == [0, pytest.approx(8 / 255)]
        assert (run_dir / "finetune" / mode / "model.safetensors").is_file()
    assert (folder / "eps_curve.png").stat().st_size > 1000
    aff = json.loads((run_dir / "finetune" / "AFF" / "config.json").read_text())
    assert aff["dual_bn_trained"] and aff["config"]["pretraining"] == "ACL" and aff["config"]["beta"] == 6.0

    # ALL gave every mode the config it gets alone
    alone = tmp_path / "alone"
    assert run("finetune", str(run_dir), "--mode", "ALF", "--out", str(alone), "--no-evaluate", *common).exit_code == 0
    cfg = lambda d, m: json.loads((d / "finetune" / m / "config.json").read_text())["config"]  # noqa: E731
    assert cfg(alone, "ALF") == cfg(run_dir, "ALF")

    # outputs are never replaced without --force
    again = run("finetune", str(run_dir), "--mode", "SLF", *common)
    assert again.exit_code == 2 and "--force" in again.stderr
    same = ["--pgd-steps", "2", "--test-limit", "32", "--corruptions", "--corruption-limit", "8"]
    again = run("evaluate", str(run_dir), "--mode", "SLF", *same)
    assert again.exit_code == 2 and "--force" in again.stderr
    # evaluations with other settings are kept apart: no --force, the first one stays
    other = run("evaluate", str(run_dir), "--mode", "SLF", "--test-limit", "8", "--eps-curve", "", "--json")
    assert other.exit_code == 0, other.output
    assert len(list((run_dir / "evaluation").glob("*/SLF.json"))) == 2
    assert (folder / "SLF.json").is_file() and Path(json.loads(other.stdout)["folder"]) != folder
    assert run("evaluate", str(run_dir), "--mode", "SLF", "--test-limit", "8", "--force", "--eps-curve",
               "").exit_code == 0
    # a fine-tuned model replaced: the evaluations of the old one go with it
    assert run("finetune", str(run_dir), "--mode", "SLF", "--force", "--no-evaluate", *common).exit_code == 0
    assert not list((run_dir / "evaluation").glob("*/SLF.json")) and (folder / "ALF.json").is_file()

    # the fine-tuned classifier leaves rsslctl: timm weights + a load_model module, same outputs as inside rsslctl
    exported = run("export", str(run_dir), "--classifier", "AFF")
    assert exported.exit_code == 0, exported.output
    import importlib.util

    from rsslctl.train.classify import load_classifier
    spec = importlib.util.spec_from_file_location("clf", run_dir / "classifier_AFF.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    outside = module.load_model(str(run_dir / "classifier_AFF.safetensors"))
    inside, _ = load_classifier(run_dir / "finetune" / "AFF", CPU)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(outside(x), inside(x), atol=1e-5)

    # an external encoder: the exported backbone through --weights; a wrong model is an error naming keys
    assert run("export", str(run_dir)).exit_code == 0
    ext = tmp_path / "ext"
    weights = str(run_dir / "encoder.safetensors")
    result = run("finetune", "--weights", weights, "--out", str(ext), "--mode", "SLF", "--set", "data.image_size=16",
                 *common)
    assert result.exit_code == 0, result.output
    assert "SLF" in result.stdout and len(list((ext / "evaluation").glob("*/SLF.json"))) == 1
    bad = run("finetune", "--weights", weights, "--timm", "resnet34", "--out", str(tmp_path / "bad"), "--mode", "SLF",
              *common)
    assert bad.exit_code == 2 and "missing layer" in bad.stderr and "wrong shape" in bad.stderr


def test_transfer_recipe_swaps_the_dataset_only() -> None:
    base = {"data": {"name": "cifar100", "labels": "coarse", "root": "/d", "image_size": 32},
            "engine": {"device": "cpu"}}
    r = ft.downstream_recipe(base, "stl10", None, 32, [])
    assert r.resolved["data"]["name"] == "stl10" and r.data.root == "/d" and r.data.image_size == 32
    assert resolve(base).resolved["data"]["labels"] == "coarse"


def test_report_rows_use_one_set_of_images_and_absent_results_are_absent(tmp_path: Path) -> None:
    from rsslctl.data.dataset import ImageData
    from rsslctl.eval.suite import evaluate_model, write_report
    model = TinyLinear().eval()
    torch.manual_seed(2)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        labels = model(images.float() / 255).argmax(1)
    labels[::3] = (labels[::3] + 1) % 10  # a third wrong: clean accuracy of a subset depends on which images
    test = ImageData(images, labels, [str(i) for i in range(10)], "t")
    opts = SuiteOptions(autoattack=True, aa_version="custom", aa_attacks=("apgd-ce",), aa_limit=12, eps_curve=(),
                        attack="pgd", single_step_attack="fgsm", pgd_steps=2)
    res = evaluate_model(model, test, "", tmp_path, opts, CPU, tmp_path / "aa.json")
    assert res["test_images"] == res["autoattack"]["images"] == 12
    assert res["clean_accuracy"] == res["autoattack"]["clean_accuracy"]  # the same 12 images in every column
    assert res["autoattack"]["robust_accuracy"] <= res["clean_accuracy"]
    assert "CA" not in res["leaderboard"] and "CA_generated" not in res["leaderboard"] and "RA" in res["leaderboard"]
    plain = evaluate_model(model, test, "", tmp_path, dataclasses.replace(opts, autoattack=False), CPU, tmp_path / "x")
    assert plain["test_images"] == 40 and "RA" not in plain["leaderboard"]
    (tmp_path / "evaluation").mkdir()
    for mode, r in (("SLF", res), ("ALF", plain)):
        (tmp_path / "evaluation" / f"{mode}.json").write_text(json.dumps({"mode": mode, **r}))
    assert write_report(tmp_path)["settings_differ"] == ["autoattack"]
