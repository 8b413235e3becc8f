"""Losses and mechanics of the issue-3 methods against naive formulas: DynACL schedules and key encoder, AIR
regularisers (true KL and the reference quantity), EMP-SSL coding rate and loss, free AT, attack-gradient
leakage, the reference free-AT schedule, rotation and jigsaw tasks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rsslctl.adversary.training import FreePerturbation
from rsslctl.nn.optim import ScheduleOptions, lr_at
from rsslctl.run.build import build_method
from rsslctl.run.recipe import load
from rsslctl.train.engine import Trainer
from rsslctl_plugins.methods.air import invariance_regularisers
from rsslctl_plugins.methods.dynacl import dynacl_weight
from rsslctl_plugins.methods.empssl import coding_rate, emp_loss
from rsslctl_plugins.methods.pretext import permutation_set

CPU = torch.device("cpu")


def method_for(tiny_recipe: Path, name: str, *overrides: str):
    recipe = load(tiny_recipe, [f"method.name={name}", *overrides])
    torch.manual_seed(0)
    return build_method(recipe, CPU), recipe


# -- DynACL schedules ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch", [1, 49, 50, 51, 100, 101, 500, 999, 1000])
def test_dynacl_weight_forms(epoch: int) -> None:
    E, K, lam = 1000, 50, 2 / 3
    s = 1 - math.floor((epoch - 1) / K) * K / E
    assert dynacl_weight(epoch, E, K, lam, "air") == pytest.approx(lam * (1 - s))
    w_adv = min(1 + math.floor(epoch / K) * (K / E) * lam, 2)  # official: L = ½[(2−w)L_nat + w L_adv]
    assert dynacl_weight(epoch, E, K, lam, "official") == pytest.approx(w_adv - 1)


def test_dynacl_epoch_start_sets_strength_and_weight(tiny_recipe: Path) -> None:
    m, _ = method_for(tiny_recipe, "dynacl", "method.period=2")
    m.on_epoch_start(5, 10)  # s = 1 − ⌊4/2⌋·2/10 = 0.6
    assert m.augment.strength == pytest.approx(0.6)
    assert m.omega == pytest.approx(2 / 3 * 0.4)


def test_dynacl_key_encoder_is_ema_and_evaluated(tiny_recipe: Path) -> None:
    m, _ = method_for(tiny_recipe, "dynacl", "method.momentum_encoder=true", "method.momentum=0.9")
    assert m.eval_encoder() is m.key_encoder
    assert not any(p.requires_grad for p in m.key_encoder.parameters())
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in m.key_encoder.parameters()]
    buffers = [b.clone() for b in m.key_encoder.buffers()]
    m.after_optimizer_step()
    for k0, k1, q in zip(before_k, m.key_encoder.parameters(), m.encoder.parameters()):
        torch.testing.assert_close(k1, 0.9 * k0 + 0.1 * q)
    for b0, b1 in zip(buffers, m.key_encoder.buffers()):
        assert torch.equal(b0, b1)
    # one training step: view 2 goes through the key encoder, gradients reach only the trained encoder
    loss, _ = m.training_step(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8),
                              torch.zeros(8, dtype=torch.long))
    loss.backward()
    assert all(p.grad is None for p in m.key_encoder.parameters())
    assert any(p.grad is not None for p in m.encoder.parameters())


# -- AIR ----------------------------------------------------------------------------------------------------
def naive_air(zi, zj, zo, zia, zja, tau, impl):
    zi, zj, zo, zia, zja = (F.normalize(z.double(), dim=1) for z in (zi, zj, zo, zia, zja))
    n = zi.shape[0]

    def pi(a, b):  # softmax over the batch of <a_k, b_k>/τ, element by element
        c = [math.exp(float(a[k] @ b[k]) / tau) for k in range(n)]
        return [v / sum(c) for v in c]

    p_i, p_j = pi(zi, zo), pi(zj, zo)
    P_i = [x * y for x, y in zip(pi(zia, zo), pi(zia, zi))]
    P_j = [x * y for x, y in zip(pi(zja, zo), pi(zja, zj))]
    if impl == "reference":  # F.kl_div(input=p, target=log q, log_target=True, sum) = Σ q (log q − p)
        sir = sum(q * (math.log(q) - p) for p, q in zip(p_i, p_j))
        air = sum(q * (math.log(q) - p) for p, q in zip(P_i, P_j))
    else:
        sir = sum(p * (math.log(p) - math.log(q)) for p, q in zip(p_i, p_j))
        Pi = [v / sum(P_i) for v in P_i]
        Pj = [v / sum(P_j) for v in P_j]
        air = sum(p * (math.log(p) - math.log(q)) for p, q in zip(Pi, Pj))
    return sir, air


@pytest.mark.parametrize("impl", ["true_kl", "reference"])
def test_air_regularisers_match_formula(impl: str) -> None:
    g = torch.Generator().manual_seed(1)
    zs = [torch.randn(6, 4, generator=g) for _ in range(5)]
    sir, air = invariance_regularisers(*zs, temperature=0.5, kl_impl=impl)
    want_sir, want_air = naive_air(*zs, 0.5, impl)
    assert float(sir) == pytest.approx(want_sir, rel=1e-5, abs=1e-6)
    assert float(air) == pytest.approx(want_air, rel=1e-5, abs=1e-6)


def test_true_kl_is_zero_for_identical_sides_and_reference_is_not() -> None:
    g = torch.Generator().manual_seed(2)
    z, zo, za = (torch.randn(5, 4, generator=g) for _ in range(3))
    sir, air = invariance_regularisers(z, z, zo, za, za, kl_impl="true_kl")
    assert float(sir) == pytest.approx(0, abs=1e-6) and float(air) == pytest.approx(0, abs=1e-6)
    sir_ref, _ = invariance_regularisers(z, z, zo, za, za, kl_impl="reference")
    assert abs(float(sir_ref)) > 1e-3  # −H(q) − <q, q>: not a divergence


def test_air_training_step_uses_original_images(tiny_recipe: Path) -> None:
    m, _ = method_for(tiny_recipe, "air")
    seen = []
    forward = m.encoder.forward
    m.encoder.forward = lambda x, route="normal": (seen.append(x.shape[0]), forward(x, route))[1]
    loss, metrics = m.training_step(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8),
                                    torch.zeros(8, dtype=torch.long))
    assert {"sir", "air", "loss_nat", "loss_adv"} <= set(metrics)
    assert seen[-1] == 8  # last forward: the 8 un-augmented originals (views are 16 rows)
    assert torch.isfinite(loss)


# -- EMP-SSL -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m_rows,d", [(5, 8), (9, 4)])
def test_coding_rate_matches_d_by_d_formula(m_rows: int, d: int) -> None:
    z = F.normalize(torch.randn(m_rows, d, dtype=torch.float64), dim=1)
    eps = 0.2
    want = 0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / (m_rows * eps) * z.t() @ z)
    assert float(coding_rate(z.float(), eps)) == pytest.approx(float(want), rel=1e-4)


def test_emp_loss_matches_formula() -> None:
    n, N, d, eps, lam = 3, 4, 6, 0.2, 200.0
    z = F.normalize(torch.randn(n * N, d, dtype=torch.float64), dim=1)
    patches = [z[p * N:(p + 1) * N] for p in range(n)]  # patch-major rows
    mean = sum(patches) / n
    tcr = sum(0.5 * float(torch.logdet(torch.eye(d, dtype=torch.float64) + d / (N * eps) * Z.t() @ Z))
              for Z in patches) / n
    inv = sum(float(F.cosine_similarity(Z[b], mean[b], dim=0)) for Z in patches for b in range(N)) / (n * N)
    loss, got_tcr, got_inv = emp_loss(z.float(), n, eps, lam, 1.0)
    assert float(got_tcr) == pytest.approx(tcr, rel=1e-4)
    assert float(got_inv) == pytest.approx(inv, rel=1e-4)
    assert float(loss) == pytest.approx(-tcr - lam * inv, rel=1e-4)


def test_empssl_bag_of_features_averages_views(tiny_recipe: Path) -> None:
    m, _ = method_for(tiny_recipe, "empssl", "encoder.head_layers=0", "method.pre_dim=8", "method.hidden_dim=8",
                      "method.z_dim=4", "method.eval_views=3")
    m.eval()
    x = torch.rand(4, 3, 16, 16)
    torch.manual_seed(5)
    feats = m.eval_features(x, "normal")
    torch.manual_seed(5)
    views = m.views(x, 3)
    want = m.pre_feature(m.encoder.features(views)).view(3, 4, -1).mean(0)
    torch.testing.assert_close(feats, want)
    m.options.eval_views = 0
    torch.testing.assert_close(m.eval_features(x, "normal"), m.pre_feature(m.encoder.features(x)))


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("recipe", ["simclr_adv.toml", "simclr_free_adv.toml"])
def test_simclr_adv_recipes_build_the_reference_heads_and_evaluate_the_pre_feature(recipe: str) -> None:
    r = load(REPO / "recipes" / recipe, ["data.name=digits", "engine.device=cpu"])
    torch.manual_seed(0)
    m = build_method(r, CPU)
    assert isinstance(m.encoder.head, torch.nn.Identity) and m.encoder.out_dim == 512
    # reference: 512 → Linear → BN → ReLU (pre-feature) → Linear → BN → ReLU → Linear → 128, biases everywhere
    kinds = [type(layer).__name__ for layer in [*m.pre_feature, *m.projector]]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    lin = [layer for layer in [*m.pre_feature, *m.projector] if isinstance(layer, torch.nn.Linear)]
    assert [(li.in_features, li.out_features) for li in lin] == [(512, 4096), (4096, 4096), (4096, 128)]
    assert all(li.bias is not None for li in lin)
    m.eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert m.embed(x).shape == (3, 128)
        feats = m.eval_features(x, "normal")
        assert feats.shape == (3, 4096) and feats.min() >= 0  # after the ReLU
        torch.testing.assert_close(feats, m.pre_feature(m.encoder.features(x)))


def test_simclr_adv_pre_dim_needs_no_encoder_head(tiny_recipe: Path) -> None:
    from rsslctl.base.errors import UserError
    with pytest.raises(UserError, match="head_layers = 0"):
        method_for(tiny_recipe, "simclr_adv", "method.pre_dim=16")
    m, _ = method_for(tiny_recipe, "simclr_adv")  # pre_dim = 0: the encoder head projects, backbone features evaluated
    assert m.pre_feature is None and m.embed(torch.rand(2, 3, 16, 16)).shape == (2, 32)


# -- free AT and gradient leakage -----------------------------------------------------------------------------
def test_free_perturbation_persists_and_steps_by_sign_of_grad() -> None:
    eps, step = 0.05, 0.03
    free = FreePerturbation(eps, step)
    x = torch.rand(4, 3, 8, 8)
    xa = free.inputs(x)
    assert torch.equal(xa, x) and xa.requires_grad  # δ starts at zero
    w = torch.randn_like(x)
    (xa * w).sum().backward()
    free.update()
    torch.testing.assert_close(free.delta, (step * w.sign()).clamp(-eps, eps))
    for _ in range(3):  # keeps stepping on new minibatches, stays in the ε-ball and the box
        x = torch.rand(4, 3, 8, 8)
        xa = free.inputs(x)
        (xa * w).sum().backward()
        free.update()
    assert free.delta.abs().max() <= eps + 1e-7
    assert float(free.delta.abs().max()) == pytest.approx(eps)
    xa = free.inputs(x)
    assert xa.min() >= 0 and xa.max() <= 1


def _boxed_batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Minibatches with many pixels exactly at 0 or 1, where clipping matters."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(4, 3, 8, 8, generator=g) * 1.4 - 0.2).clamp(0, 1) for _ in range(n)]


def _grad(xa: torch.Tensor) -> torch.Tensor:
    """∂/∂xa of the test objective Σ sin(7·xa)·xa, so the gradient's sign depends on where xa is."""
    return torch.sin(7 * xa) + 7 * xa * torch.cos(7 * xa)


def _run_free(free: FreePerturbation, batches: list[torch.Tensor], m: int) -> list[torch.Tensor]:
    seen = []
    for x in batches:
        for _ in range(m):
            xa = free.inputs(x)
            seen.append(xa.detach().clone())
            (torch.sin(7 * xa) * xa).sum().backward()
            free.update()
    return seen


def test_free_reference_delta_matches_cf_amc_order_of_operations() -> None:
    eps, alpha, m = 8 / 255, 0.01, 3
    batches = _boxed_batches(4)
    # CF-AMC-SSL, written out: forward on x + δ (no clip), backward, optimizer step, then
    # δ ← clip(δ + α·sign(∇δ), −ε, ε) and δ ← clip(x + δ, 0, 1) − x with the current minibatch x
    delta, want = torch.zeros_like(batches[0]), []
    for x in batches:
        for _ in range(m):
            xa = x + delta
            want.append(xa.clone())
            delta = (delta + alpha * _grad(xa).sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    free = FreePerturbation(eps, alpha, reference=True)
    got = _run_free(free, batches, m)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=f"forward {i}")
    torch.testing.assert_close(free.delta, delta, rtol=0, atol=1e-7)
    # the first replay of a new minibatch reuses a δ fitted to the previous one: inputs leave the box
    assert min(float(a.min()) for a in got) < -1e-3 and max(float(a.max()) for a in got) > 1 + 1e-3
    assert all(-eps - 1e-6 <= float(a.min()) and float(a.max()) <= 1 + eps + 1e-6 for a in got)
    for k in range(1, len(got)):  # later replays of a minibatch were re-projected onto [0, 1]
        if k % m:
            assert 0 <= float(got[k].min()) and float(got[k].max()) <= 1


def test_free_default_delta_clips_every_input_and_is_not_reprojected() -> None:
    eps, alpha, m = 8 / 255, 0.01, 3
    batches = _boxed_batches(4)
    delta, want = torch.zeros_like(batches[0]), []
    for x in batches:
        for _ in range(m):
            xa = (x + delta).clamp(0, 1)
            want.append(xa)
            delta = (delta + alpha * _grad(xa).sign()).clamp(-eps, eps)
    free = FreePerturbation(eps, alpha)
    got = _run_free(free, batches, m)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
        assert 0 <= float(a.min()) and float(a.max()) <= 1
    torch.testing.assert_close(free.delta, delta, rtol=0, atol=1e-7)


def test_reference_delta_option_reaches_the_perturbation(tiny_recipe: Path) -> None:
    for name in ("simclr_adv", "empssl_adv"):
        extra = ["encoder.head_layers=0", "method.n_views=2"] if name == "empssl_adv" else []
        m, _ = method_for(tiny_recipe, name, "method.training=free", *extra)
        assert m.free.reference is False
        m, _ = method_for(tiny_recipe, name, "method.training=free", "method.reference_delta=true", *extra)
        assert m.free.reference is True


def test_free_training_replays_views_and_updates_delta(tiny_recipe: Path) -> None:
    m, _ = method_for(tiny_recipe, "simclr_adv", "method.training=free", "method.replays=2", "attack.step_size=0.01")
    assert m.replays == 2
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    deltas, views = [], []
    for _ in range(2):
        loss, _ = m.training_step(images, torch.zeros(8, dtype=torch.long))
        views.append(m._views.clone())
        loss.backward()  # the engine's single backward: parameter grads and ∂loss/∂(x+δ)
        m.after_optimizer_step()
        deltas.append(m.free.delta.clone())
    assert torch.equal(views[0], views[1])  # same views for every replay of a minibatch
    assert deltas[0].abs().max() > 0 and not torch.equal(deltas[0], deltas[1])
    assert deltas[1].abs().max() <= 8 / 255 + 1e-7
    m.training_step(images, torch.zeros(8, dtype=torch.long))
    assert not torch.equal(m._views, views[0])  # a new minibatch gets fresh views


def test_leaked_attack_gradients_equal_sum_over_attack_steps(tiny_recipe: Path) -> None:
    m, _ = method_for(tiny_recipe, "simclr_adv", "method.leak_attack_grads=true", "attack.random_start=false",
                      "attack.steps=2", "encoder.head_layers=0")
    m.eval()  # deterministic forwards, so the attack objective can be re-evaluated below
    params = [p for p in m.parameters() if p.requires_grad]
    x = torch.rand(6, 3, 16, 16)
    iterates = []

    def objective(xa):
        iterates.append(xa.detach().clone())
        return (m.encoder(xa) ** 2).sum()

    _, extra = m.adversarial(x, objective)
    assert float(extra.detach()) == 0.0
    got = torch.autograd.grad(extra, params, allow_unused=True)
    want = [torch.zeros_like(p) for p in params]
    for xa in iterates:
        for acc, g in zip(want, torch.autograd.grad((m.encoder(xa) ** 2).sum(), params, allow_unused=True)):
            if g is not None:
                acc += g
    assert len(iterates) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(w), w, rtol=1e-4, atol=1e-5)
    m.options.leak_attack_grads = False
    assert m.adversarial(x, objective)[1] is None


def test_reference_free_schedule_cycles_the_cosine(tiny_recipe: Path) -> None:
    s = ScheduleOptions(kind="cosine", min_lr=0.0, scheduler_step="after")  # CF-AMC-SSL steps after the optimizer
    assert lr_at(150, 100, 0, 1.0, s, periodic=True) == pytest.approx(0.5)  # back up after the first period
    assert lr_at(200, 100, 0, 1.0, s, periodic=True) == pytest.approx(1.0)
    assert lr_at(150, 100, 0, 1.0, s) == pytest.approx(0.0)
    base = ["method.name=simclr_adv", "method.training=free", "method.replays=3"]
    fixed = Trainer(load(tiny_recipe, base), tiny_recipe.parent / "a", quiet=True)
    quirk = Trainer(load(tiny_recipe, base + ["method.reference_schedule=true"]), tiny_recipe.parent / "b", quiet=True)
    assert fixed.schedule_steps == 3 * quirk.schedule_steps == 3 * 3 * fixed.steps_per_epoch
    assert fixed.total_steps == quirk.total_steps  # the same optimizer steps are taken either way


# -- pretext tasks ----------------------------------------------------------------------------------------------
def test_rotation_task_labels_match_rotations(tiny_recipe: Path) -> None:
    m, _ = method_for(tiny_recipe, "rotation", "encoder.head_layers=0")
    v = torch.rand(3, 3, 16, 16)
    x, y = m.task(v, torch.zeros(3, dtype=torch.long))
    for i in range(12):
        torch.testing.assert_close(x[i], torch.rot90(v[i % 3], int(y[i]), dims=(1, 2)))


def test_jigsaw_task_permutes_tiles(tiny_recipe: Path) -> None:
    m, _ = method_for(tiny_recipe, "jigsaw", "encoder.head_layers=0", "method.grid=2")
    assert len(m.perms) == 24 and m.classifier.out_features == 24
    v = torch.rand(5, 3, 16, 16)
    x, y = m.task(v, torch.zeros(5, dtype=torch.long))
    for i in range(5):
        tiles = [v[i, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] for r in range(2) for c in range(2)]
        order = m.perms[y[i]].tolist()
        for t in range(4):
            r, c = divmod(t, 2)
            assert torch.equal(x[i, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8], tiles[order[t]])
    assert len({tuple(p) for p in permutation_set(9, 31).tolist()}) == 31


# -- DynACL++ post-processing ----------------------------------------------------------------------------------
def test_dynacl_pp_writes_an_evaluable_run(tiny_recipe: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from rsslctl.cli.evaluate import evaluate_run
    from rsslctl.run.directory import prepare_run_dir
    from rsslctl.runtime.checkpoint import latest_checkpoint, load_checkpoint
    recipe = load(tiny_recipe, ["method.name=dynacl", "method.momentum_encoder=true", "schedule.epochs=1",
                                "data.limit=64"])
    src = tmp_path / "src"
    trainer = Trainer(recipe, src, quiet=True)
    prepare_run_dir(recipe, src, force=False)
    trainer.fit()
    before = load_checkpoint(latest_checkpoint(src))[0]
    out = tmp_path / "pp"
    cli = [sys.executable, "-m", "rsslctl.cli", "dynacl-pp", str(src), "--out", str(out), "--clusters", "3",
           "--probe-epochs", "1", "--epochs", "1", "--batch-size", "32", "--steps", "1"]
    res = subprocess.run(cli, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    info = json.loads((out / "postprocess.json").read_text())
    assert sum(info["cluster_sizes"]) == 64 and len(info["cluster_sizes"]) == 3
    after = load_checkpoint(latest_checkpoint(out))[0]
    key = [k for k in after if k.startswith("key_encoder.backbone.") and k.endswith("conv1.weight")][0]
    assert not torch.equal(before[key], after[key])  # the evaluated (key) encoder was fine-tuned
    q = key.replace("key_encoder.", "encoder.", 1)
    assert torch.equal(before[q], after[q])  # the trained encoder is left alone
    assert torch.equal(load_checkpoint(latest_checkpoint(src))[0][key], before[key])  # source run untouched
    result = evaluate_run(out, ["evaluation.epochs=1", "evaluation.limit=16", "evaluation.steps=1"])
    assert 0.0 <= result["clean_accuracy"] <= 1.0
    again = subprocess.run(cli, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
