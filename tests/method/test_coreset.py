"""Coreset selection (RCS): losses and sketches against their formulas, per-unit and sharded
gradients, the greedy search, selectors, the in-loop schedule with exact resume, indices files and the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_user_error, run
from conftest import assert_same_tensors, kill_and_resume, train_run
from torch import Tensor, nn

from rsslctl.base import registry
from rsslctl.method.base import Method
from rsslctl.method.coreset import (
    CoresetTarget,
    SelectionContext,
    budget_for,
    load_selection,
    run_selector,
    split_validation,
)
from rsslctl.nn.losses import nt_xent
from rsslctl.nn.optim import StepClock, lr_at
from rsslctl.run.build import build_method, load_split
from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load
from rsslctl.runtime.checkpoint import latest_checkpoint, load_checkpoint
from rsslctl.train.engine import Trainer
from rsslctl_plugins.attacks.pgd import PGD, PGDOptions
from rsslctl_plugins.methods.pretext import ClassifierTarget
from rsslctl_plugins.selectors.rcs import (
    RCS,
    RCSOptions,
    compute_gradients,
    gather,
    greedy,
    representational_divergence,
    sketch,
    split_picks,
    unit_gradients,
)

CORESET = ["coreset.name='rcs'", "coreset.fraction=0.4", "coreset.warmup_epochs=1", "coreset.every=2"]


# -- formulas -------------------------------------------------------------------------------------------------------
def test_nt_xent_per_image_terms_match_formula() -> None:
    torch.manual_seed(0)
    z, tau = torch.randn(8, 5), 0.5
    per_image = nt_xent(z, tau, reduction="per_image")
    zn = z / z.norm(dim=1, keepdim=True)
    naive = []
    for k in range(4):
        terms = []
        for a, p in ((2 * k, 2 * k + 1), (2 * k + 1, 2 * k)):
            denom = sum(math.exp(float(zn[a] @ zn[b]) / tau) for b in range(8) if b != a)
            terms.append(-math.log(math.exp(float(zn[a] @ zn[p]) / tau) / denom))
        naive.append(sum(terms) / 2)
    assert torch.allclose(per_image, torch.tensor(naive), atol=1e-5)
    assert torch.allclose(per_image.mean(), nt_xent(z, tau), atol=1e-6)


def test_representational_divergences_match_formulas() -> None:
    torch.manual_seed(1)
    nat, adv = torch.randn(3, 4), torch.randn(3, 4)
    total = 0.0
    for i in range(3):
        lo_a, hi_a, lo_n, hi_n = adv[i].min(), adv[i].max(), nat[i].min(), nat[i].max()
        for j in range(4):
            p = float((adv[i, j] - lo_a) / (hi_a - lo_a)) + 1e-8
            q = float((nat[i, j] - lo_n) / (hi_n - lo_n)) + 1e-8
            total += p * (math.log(p) - math.log(q))
    assert representational_divergence(nat, adv, "minmax_kl").item() == pytest.approx(total / 12, rel=1e-5)
    kl = 0.0
    for i in range(3):
        pn, pa = nat[i].softmax(0), adv[i].softmax(0)
        kl += sum(float(pn[j] * (pn[j].log() - pa[j].log())) for j in range(4))
    assert representational_divergence(nat, adv, "softmax_kl").item() == pytest.approx(kl / 3, rel=1e-5)
    assert representational_divergence(nat, nat, "softmax_kl").item() == pytest.approx(0.0, abs=1e-6)


def test_sketch_averages_weight_rows_and_bias() -> None:
    w, b, w2 = torch.randn(2, 3, 5), torch.randn(2, 3), torch.randn(2, 4, 3)
    s = sketch([w, b, w2])
    assert s.shape == (2, 5 + 1 + 3)
    for k in range(2):
        naive = [sum(w[k, r, c] for r in range(3)) / 3 for c in range(5)] + [b[k].sum() / 3] \
            + [sum(w2[k, r, c] for r in range(4)) / 4 for c in range(3)]
        assert torch.allclose(s[k], torch.stack(naive), atol=1e-6)


class PairTarget(CoresetTarget):
    """A contrastive toy target: fixed features of two noisy copies per image, a linear-BN-linear head."""

    def __init__(self) -> None:
        torch.manual_seed(2)
        self.proj = nn.Linear(12, 6)
        self.net = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 4, bias=False)).eval()

    def modules(self):
        return [self.proj, self.net]

    def layers(self):
        return [self.net[0], self.net[2]]

    def features(self, x, route):
        return self.proj(x.flatten(1))

    def head(self, f, route):
        return self.net(f)

    def training_losses(self, images, labels):
        x = images.float() / 255
        views = torch.stack((x, x.flip(-1)), 1).flatten(0, 1)
        with torch.no_grad():
            f = self.features(views, "normal")
        return nt_xent(self.head(f, "normal"), 0.5, reduction="per_image")


def test_unit_gradients_equal_separate_backward_per_unit() -> None:
    target = PairTarget()
    images = torch.randint(0, 256, (8, 1, 3, 4), dtype=torch.uint8)
    params = [target.net[0].weight, target.net[0].bias, target.net[2].weight]
    per_unit = unit_gradients(target, images, torch.zeros(8, dtype=torch.long), unit=2)
    assert [g.shape[0] for g in per_unit] == [4, 4, 4]
    for j in range(4):
        naive = torch.autograd.grad(target.training_losses(images, None)[2 * j:2 * j + 2].mean(), params)
        for got, want in zip(per_unit, naive):
            assert torch.allclose(got[j], want, atol=1e-6)
    whole = unit_gradients(target, images, None, unit=8)  # the reference: one minibatch = one unit
    for got, want in zip(whole, torch.autograd.grad(target.training_losses(images, None).mean(), params)):
        assert torch.allclose(got[0], want, atol=1e-6)


# -- greedy ---------------------------------------------------------------------------------------------------------
def test_greedy_follows_the_updated_validation_gradient() -> None:
    torch.manual_seed(3)
    sketches, v0 = torch.randn(10, 4), torch.randn(4)
    state = {"v": v0.clone()}

    def val_sketch():
        return state["v"].clone()

    def step(row):
        state["v"] = state["v"] - 0.5 * sketches[row]  # the validation gradient moves after each pick

    chosen = greedy(sketches, 4, val_sketch, step)
    v, naive, left = v0, [], set(range(10))
    for _t in range(4):
        best = max(left, key=lambda r: float(sketches[r] @ v))
        naive.append(best)
        left.remove(best)
        v = v - 0.5 * sketches[best]
    assert chosen == naive and len(set(chosen)) == 4


def test_split_picks_is_proportional_and_exact() -> None:
    assert split_picks(5, [10, 10, 5]) == [2, 2, 1]
    assert sum(split_picks(7, [3, 9, 4])) == 7


# -- selectors on the tiny ACL model ----------------------------------------------------------------------------------
@pytest.fixture
def tiny_context(tiny_recipe: Path):
    recipe = load(tiny_recipe)
    torch.manual_seed(0)
    method = build_method(recipe, torch.device("cpu"))
    train = load_split(recipe, "train").subset(torch.arange(96))
    pool, val = split_validation(96, 0.05, seed=0)
    return SelectionContext(train.images, train.labels, pool, val, 32, 11, method)


def test_sharded_gradients_gathered_equal_one_worker(tiny_context: SelectionContext) -> None:
    ctx = tiny_context
    target = ctx.target()
    args = (target, ctx.images, ctx.labels, ctx.pool, 32, 16, 5, True)
    units, single = compute_gradients(*args)
    shards = [compute_gradients(*args, shard=(r, 2))[1] for r in (1, 0)]
    merged = gather(shards)
    assert torch.equal(merged.units, single.units) and torch.equal(merged.units, torch.arange(len(units)))
    assert torch.allclose(merged.sketches, single.sketches, atol=1e-6)
    assert torch.allclose(merged.full, single.full, atol=1e-6)
    assert (units.shape == (len(ctx.pool) // 32 * 2, 16)
            and not set(units.flatten().tolist()) & set(ctx.validation.tolist()))


def test_rcs_selects_from_pool_and_leaves_the_model_untouched(tiny_context: SelectionContext) -> None:
    ctx = tiny_context
    before = {k: v.clone() for k, v in ctx.method.state_dict().items()}
    grads_before = [p.requires_grad for p in ctx.method.parameters()]
    out = run_selector(RCS(RCSOptions(unit=8, steps=1)), ctx, 32)
    assert len(out) == 32 and len(out.unique()) == 32
    assert set(out.tolist()) <= set(ctx.pool.tolist())
    assert_same_tensors(ctx.method.state_dict(), before)  # head steps undone, BN statistics not updated
    assert [p.requires_grad for p in ctx.method.parameters()] == grads_before
    assert torch.equal(out, run_selector(RCS(RCSOptions(unit=8, steps=1)), ctx, 32))  # seeded by the context


def test_reference_double_step_equals_twice_the_head_lr(tiny_context: SelectionContext) -> None:
    ctx = tiny_context
    double = run_selector(RCS(RCSOptions(unit=4, head_lr=0.5, double_step=True, steps=1)), ctx, 32)
    twice = run_selector(RCS(RCSOptions(unit=4, head_lr=1.0, steps=1)), ctx, 32)
    single = run_selector(RCS(RCSOptions(unit=4, head_lr=0.5, steps=1)), ctx, 32)
    assert torch.equal(double, twice)
    assert not torch.equal(double, single)  # the head step matters to later picks


def test_random_selector_and_unit_errors(tiny_context: SelectionContext) -> None:
    random_cls = registry.get("coreset", "random")
    a = run_selector(random_cls(None), tiny_context, 64)
    assert len(a) == 64 and set(a.tolist()) <= set(tiny_context.pool.tolist())
    with pytest.raises(Exception, match="coreset.unit = 12 must divide schedule.batch_size = 32"):
        run_selector(RCS(RCSOptions(unit=12)), tiny_context, 32)


# -- SAT-RCS on a tiny supervised classifier --------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 10)


def test_sat_rcs_uses_last_layer_ce_gradients_and_logit_rd() -> None:
    torch.manual_seed(4)
    net = TinyNet()
    attack = PGD(PGDOptions(steps=2, random_start=False))
    target = ClassifierTarget(net.body, net.fc, attack, [net])
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (8,))
    grads = unit_gradients(target, images, labels, unit=4)
    x = images.float() / 255
    x_adv = attack.perturb(x, lambda xa: F.cross_entropy(net.fc(net.body(xa)), labels, reduction="sum"))
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    for j in range(2):
        ce = F.cross_entropy(net.fc(net.body(x_adv[4 * j:4 * j + 4]).detach()), labels[4 * j:4 * j + 4])
        want = torch.autograd.grad(ce, [net.fc.weight, net.fc.bias])
        assert torch.allclose(grads[0][j], want[0], atol=1e-5) and torch.allclose(grads[1][j], want[1], atol=1e-5)
    assert target.default_divergence == "softmax_kl" and sketch(grads).shape == (2, 4 + 1)

    class TinySAT(Method):
        """Tiny supervised classifier exposing the generic classifier target."""

        name = "tiny_sat"

        def coreset_target(self):
            return ClassifierTarget(net.body, net.fc, attack, [net])

    ctx = SelectionContext(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (40,)),
                           torch.arange(4, 40), torch.arange(4), 8, 1, TinySAT(None, None, None, None))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = run_selector(RCS(RCSOptions(unit=4, steps=1)), ctx, 16)
    assert len(out) == 16 and out.min() >= 4
    assert_same_tensors(net.state_dict(), before)


# -- LR clock ----------------------------------------------------------------------------------------------------------
def test_step_clock_equal_epochs_is_the_plain_schedule_and_epochs_mode_tracks_progress() -> None:
    from rsslctl.nn.optim import ScheduleOptions
    sched = ScheduleOptions(epochs=6, warmup_epochs=1)
    plain = StepClock([5] * 6, replays=2, warmup_epochs=1)
    assert plain.total_steps == 60 and plain.step(3, 4, 1) == (2 * 5 + 4) * 2 + 1
    assert plain.lr_position(3, 4, 1) == (29, 60, 10)
    short = StepClock([5, 5, 1, 1, 1, 1], warmup_epochs=1, by="epochs")
    full = StepClock([5] * 6, warmup_epochs=1)
    after = ScheduleOptions(epochs=6, warmup_epochs=1, scheduler_step="after")
    for epoch in range(1, 7):  # a scheduler stepped after the optimizer: every epoch starts at the full run's LR
        assert lr_at(*short.lr_position(epoch, 0), 1.0, after) == pytest.approx(
            lr_at(*full.lr_position(epoch, 0), 1.0, after))
    # stepped before each iteration (RCS): every epoch's last step ends where the full run's does
    for epoch in range(1, 7):
        n = short.epoch_steps[epoch - 1]
        assert lr_at(*short.lr_position(epoch, n - 1), 1.0, sched) == pytest.approx(
            lr_at(*full.lr_position(epoch, 4), 1.0, sched))
    # RCS rebuilds its schedule each epoch for the current loader length L (here 1): step i of epoch e runs at
    # position (e − 1)·L + i + 1 of E·L, with W·L warm-up steps
    assert short.lr_position(4, 0) == (3, 6, 1)
    assert lr_at(*short.lr_position(4, 0), 1.0, sched) == pytest.approx(
        1e-6 + (1 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (3 + 1 - 1) / (6 - 1))))
    steps = StepClock([5, 5, 1, 1, 1, 1], warmup_epochs=1, by="steps")
    assert steps.total_steps == 14 and steps.lr_position(6, 0) == (13, 14, 5)
    assert lr_at(*steps.lr_position(6, 0), 1.0, sched) < lr_at(*steps.lr_position(3, 0), 1.0, sched)


# -- engine ------------------------------------------------------------------------------------------------------------
def _train(recipe_path: Path, run_dir: Path, overrides: list[str], on_step=None) -> Trainer:
    return train_run(load(recipe_path, overrides), run_dir, on_step)


def test_coreset_run_shrinks_epochs_and_resumes_exactly(tiny_recipe: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    trainer = _train(tiny_recipe, full, CORESET)
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["images"] for r in epochs] == [64, 32, 32]  # 95-image pool (1 held out) → 2 steps, then 1-step coreset
    assert [r["selected"] for r in epochs] == [False, True, False]  # selected at epoch 2, reused in epoch 3
    assert [r["step"] for r in records if r["kind"] == "step"] == [0, 1, 2, 3]
    indices = load_checkpoint(latest_checkpoint(full))[1]["coreset.indices"]
    assert len(indices) == 32 and not set(indices.tolist()) & set(trainer.coreset.validation.tolist())
    # killed in epoch 3 (step 3), which needs the saved coreset once resumed
    kill_and_resume(load(tiny_recipe, CORESET), tmp_path / "broken", 3, reference=full)


class Recorder(Method):
    """Records the images of every training step (to check which indices an epoch trains on)."""

    name = "recorder"
    seen: list[tuple[int, Tensor]] = []

    def on_epoch_start(self, epoch: int, total: int) -> None:
        self.epoch = epoch

    def training_step(self, images, labels):
        Recorder.seen.append((self.epoch, images.clone()))
        return self.encoder(images.float() / 255).pow(2).mean(), {}


def test_indices_file_is_trained_on_after_the_warmup(tiny_recipe: Path, tmp_path: Path, register_methods) -> None:
    register_methods(Recorder)
    chosen = torch.arange(0, 96, 3)  # 32 images
    from rsslctl.method.coreset import save_selection
    save_selection(tmp_path / "sel.json", chosen, {"train_size": 96, "dataset": "digits"})
    Recorder.seen.clear()
    _train(tiny_recipe, tmp_path / "run", ["method.name='recorder'", "attack.name='none'", "coreset.warmup_epochs=1",
                                            f"coreset.indices_file={str(tmp_path / 'sel.json')!r}"])
    train = load_split(load(tiny_recipe), "train").images[:96]
    allowed = train[chosen].flatten(1)
    after = [imgs for epoch, imgs in Recorder.seen if epoch > 1]
    assert len(after) == 2 and all(len(b) == 32 for b in after)
    for batch in after:
        assert ((batch.flatten(1)[:, None] == allowed[None]).all(-1)).any(1).all()
    assert sum(len(b) for e, b in Recorder.seen if e == 1) == 96  # the warm-up sees the whole split


def test_budget_is_floored_to_whole_minibatches_like_the_reference() -> None:
    # CIFAR-10 at fraction 0.05: 49,500 pool images → 4.83 minibatches of 512 → 4 (rounding would give 5)
    assert budget_for(49_500, 0.05, 512) == 4 * 512
    assert budget_for(100, 0.5, 32) == 32  # 1.56 → 1
    assert budget_for(10, 0.01, 8) == 8  # never empty: at least one minibatch


# -- CLI and errors ---------------------------------------------------------------------------------------------------


def test_select_coreset_writes_indices_with_metadata(tiny_recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "sel.safetensors"
    result = run("select-coreset", str(tiny_recipe), "--fraction", "0.3", "--out", str(out), "--set", "coreset.unit=16")
    assert result.exit_code == 0, result.output
    indices, meta = load_selection(out)
    assert (meta["selector"] == "rcs" and meta["fraction"] == 0.3 and meta["seed"] == 3
            and len(meta["encoder_sha256"]) == 64)
    assert meta["train_size"] == 96 and len(indices) == meta["size"] == 32
    js = tmp_path / "sel.json"
    assert run("select-coreset", str(tiny_recipe), "--fraction", "0.3", "--out", str(js),
                "--set", "coreset.name='random'").exit_code == 0
    data = json.loads(js.read_text())
    assert data["selector"] == "random" and len(data["indices"]) == 32 and data["options"]["fraction"] == 0.3
    assert_user_error(run("select-coreset", str(tiny_recipe), "--fraction", "0.3", "--out", str(js)),
                    "already exists", "--force")
    assert json.loads(js.read_text()) == data  # nothing overwritten


@pytest.mark.parametrize("args, fragments", [
    (["--fraction", "0"], ["--fraction 0.0", "(0, 1]"]),
    (["--fraction", "1.5"], ["--fraction 1.5", "(0, 1]"]),
    (["--fraction", "0.2", "--set", "coreset.name='rcss'"], ["unknown coreset 'rcss'", "did you mean 'rcs'"]),
    (["--fraction", "0.2", "--set", "method.name='simclr'", "--set", "attack.name='none'"],
     ["method 'simclr' exposes no coreset target", "random"]),
])
def test_select_coreset_errors(tiny_recipe: Path, tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    assert_user_error(run("select-coreset", str(tiny_recipe), "--out", str(tmp_path / "x.json"), *args), *fragments)
    assert not (tmp_path / "x.json").exists()


def test_select_coreset_needs_a_trained_encoder_in_a_run_dir(tmp_path: Path, tiny_recipe: Path) -> None:
    run_dir = tmp_path / "run"
    prepare_run_dir(load(tiny_recipe), run_dir, force=False)
    assert_user_error(run("select-coreset", "--run-dir", str(run_dir), "--fraction", "0.2",
                          "--out", str(tmp_path / "s.json")), "no checkpoint yet")


@pytest.mark.parametrize("overrides, fragments", [
    (["coreset.name=rcs", "coreset.warmup_epochs=3"], ["coreset.warmup_epochs = 3", "schedule.epochs = 3"]),
    (["coreset.name=rcs", "coreset.indices_file='a.json'"], ["both indices_file and selector 'rcs'"]),
    (["coreset.fraction=2"], ["coreset.fraction", "above the maximum"]),
    (["coreset.indices_file='missing.json'"], ["missing.json not found", "select-coreset"]),
    (["coreset.name=rcs", "coreset.validation_fraction=0"], ["validation_fraction = 0", "needs an unlabeled"]),
    (["coreset.name=rcs", "method.name=simclr", "attack.name=none"], ["method 'simclr' exposes no coreset target"]),
])
def test_bad_coreset_recipes_fail_before_training(tiny_recipe: Path, overrides: list[str],
                                                  fragments: list[str]) -> None:
    args = ["pretrain", str(tiny_recipe), "--quiet"]
    for o in overrides:
        args += ["--set", o]
    assert_user_error(run(*args), *fragments)
    assert not (tiny_recipe.parent / "runs").exists()


def test_indices_file_from_another_dataset_size_is_refused(tiny_recipe: Path, tmp_path: Path) -> None:
    from rsslctl.method.coreset import save_selection
    save_selection(tmp_path / "s.json", torch.arange(40), {"train_size": 1347, "dataset": "digits"})
    assert_user_error(run("pretrain", str(tiny_recipe), "--quiet", "--set", "coreset.warmup_epochs=1",
                         "--set", f"coreset.indices_file={str(tmp_path / 's.json')!r}"), "1347", "96")


def test_default_recipe_has_no_coreset(tiny_recipe: Path) -> None:
    recipe = load(tiny_recipe)
    assert recipe.resolved["coreset"]["name"] == "none" and recipe.selector.cls is None


def test_sat_rcs_selects_through_the_sat_plugin(tiny_recipe: Path, tmp_path: Path) -> None:
    """SAT-RCS end to end: the `sat` method exposes its last linear layer to RCS."""
    out = tmp_path / "sat_rcs.json"
    result = run("select-coreset", str(tiny_recipe), "--fraction", "0.5", "--out", str(out),
                 "--set", "method.name=sat", "--set", "coreset.name=rcs")
    assert result.exit_code == 0, result.output
    meta = json.loads(out.read_text())
    assert meta["selector"] == "rcs" and 0 < len(meta["indices"]) < 96
