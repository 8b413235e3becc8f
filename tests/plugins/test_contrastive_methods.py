"""RoCL, AdvCL, BYORL, CLAE, DeACL and the shared momentum / teacher pieces: losses against their formulas written out
independently, adversaries that raise what they attack inside their ε-ball, exact resume of EMA and teacher state,
and one-line errors for a missing or incompatible teacher."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_tensors, final_checkpoint, kill_and_resume, train_run
from torch import nn

from rsslctl.base.errors import UserError
from rsslctl.nn.momentum import MomentumSchedule, cosine_momentum, ema_update, mlp_head
from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load
from rsslctl.runtime.checkpoint import latest_checkpoint
from rsslctl.train.engine import Trainer
from rsslctl_plugins.methods.advcl import advcl_loss, high_frequency, nearest_centroid
from rsslctl_plugins.methods.byorl import byol_loss, swap_views
from rsslctl_plugins.methods.clae import clae_loss
from rsslctl_plugins.methods.deacl import deacl_loss
from rsslctl_plugins.methods.rocl import rocl_loss

SMALL = ["schedule.epochs=1", "data.limit=16", "schedule.batch_size=8", "schedule.warmup_epochs=0"]


# -- independent formulas ----------------------------------------------------------------------------------------
def naive_contrastive(groups: list[list[torch.Tensor]], tau: float) -> torch.Tensor:
    """Mean over (anchor, positive) pairs of −log(exp(s_ap/τ) / Σ_{b≠a} exp(s_ab/τ)); groups[k] = image k's
    embeddings."""
    items = [(k, F.normalize(z.double(), dim=0)) for k, g in enumerate(groups) for z in g]
    terms = []
    for a, (ka, za) in enumerate(items):
        denom = sum(math.exp(float(za @ zb) / tau) for b, (_, zb) in enumerate(items) if b != a)
        for p, (kp, zp) in enumerate(items):
            if p != a and kp == ka:
                terms.append(-math.log(math.exp(float(za @ zp) / tau) / denom))
    return torch.tensor(sum(terms) / len(terms), dtype=torch.float64)


def test_rocl_loss_is_three_view_nt_xent_plus_regulariser_over_lambda() -> None:
    torch.manual_seed(0)
    z1, z2, za = (torch.randn(4, 6) for _ in range(3))
    tau, lam = 0.5, 8.0
    want = (2 * naive_contrastive([[z1[k], z2[k], za[k]] for k in range(4)], tau)  # reference: Σ of 6N terms / 3N
            + naive_contrastive([[za[k], z2[k]] for k in range(4)], tau) / lam)
    torch.testing.assert_close(rocl_loss(z1, z2, za, tau, lam).double(), want, atol=1e-5, rtol=1e-5)
    # the reference's detached transpose: the same value, gradients through one side only
    zs = [t.clone().requires_grad_(True) for t in (z1, z2, za)]
    one = rocl_loss(*zs, tau, lam, one_sided=True)
    torch.testing.assert_close(one.double(), want, atol=1e-5, rtol=1e-5)
    g_one = torch.autograd.grad(one, zs)
    g_two = torch.autograd.grad(rocl_loss(*zs, tau, lam), zs)
    assert not torch.allclose(g_one[0], g_two[0])


def test_clae_loss_adds_the_adversarial_positive_with_weight_alpha() -> None:
    torch.manual_seed(1)
    z1, z2, za = (torch.randn(5, 4) for _ in range(3))
    want = (naive_contrastive([[z1[k], z2[k]] for k in range(5)], 0.5)
            + 0.7 * naive_contrastive([[z1[k], za[k]] for k in range(5)], 0.5))
    torch.testing.assert_close(clae_loss(z1, z2, za, 0.5, 0.7).double(), want, atol=1e-5, rtol=1e-5)


def test_byol_loss_is_the_squared_distance_of_unit_vectors() -> None:
    torch.manual_seed(2)
    p, z = torch.randn(6, 5), torch.randn(6, 5)
    want = ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    torch.testing.assert_close(byol_loss(p, z), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(swap_views(torch.arange(6)), torch.tensor([1, 0, 3, 2, 5, 4]))


def test_deacl_loss_matches_its_cosine_terms() -> None:
    torch.manual_seed(3)
    f, fa, t = (torch.randn(4, 7) for _ in range(3))
    unit = lambda v: v / v.norm(dim=1, keepdim=True)  # noqa: E731
    want = -(unit(f) * unit(t)).sum(1).mean() - 2.0 * (unit(fa) * unit(f)).sum(1).mean()
    torch.testing.assert_close(deacl_loss(f, fa, t, 2.0), want, atol=1e-6, rtol=1e-6)


def test_advcl_loss_is_four_view_supcon_plus_weighted_mean_cross_entropy() -> None:
    torch.manual_seed(4)
    z = torch.randn(12, 5)  # 3 images × 4 interleaved views
    logits = [torch.randn(3, 2), torch.randn(3, 4)]
    labels = [torch.tensor([0, 1, 1]), torch.tensor([3, 0, 2])]
    ce = [-(lg.log_softmax(1)[torch.arange(3), y]).mean() for lg, y in zip(logits, labels)]
    want = naive_contrastive([list(z[4 * k:4 * k + 4]) for k in range(3)], 0.5) + 0.2 * (ce[0] + ce[1]) / 2
    torch.testing.assert_close(advcl_loss(z, logits, labels, 0.5, 0.2, base_temperature=0.5).double(), want.double(),
                               atol=1e-5, rtol=1e-5)  # base = τ: unscaled SupCon


def test_high_frequency_view_removes_the_centred_disc_of_the_spectrum() -> None:
    torch.manual_seed(5)
    x = torch.rand(2, 3, 16, 16)
    spec = np.fft.fftshift(np.fft.fft2(x.double().numpy()), axes=(-2, -1))
    for i in range(16):
        for j in range(16):
            if (i - 8) ** 2 + (j - 8) ** 2 < 4 ** 2:  # the reference removes distance < r
                spec[..., i, j] = 0
    want = np.fft.ifft2(np.fft.ifftshift(spec, axes=(-2, -1))).real
    torch.testing.assert_close(high_frequency(x, 4.0).double(), torch.from_numpy(want), atol=1e-5, rtol=1e-5)
    assert high_frequency(torch.full((1, 1, 8, 8), 0.7), 2.0).abs().max() < 1e-6  # a flat image has no high frequency


def test_nearest_centroid_is_the_euclidean_argmin() -> None:
    torch.manual_seed(6)
    f, c = torch.randn(20, 5), torch.randn(4, 5)
    assert torch.equal(nearest_centroid(f, c), torch.cdist(f, c).argmin(1))


# -- momentum pieces -----------------------------------------------------------------------------------------------
def test_ema_update_float_is_lerp_bit_for_bit_and_tensor_momentum_matches_the_formula() -> None:
    torch.manual_seed(7)
    online, target = nn.Linear(4, 3), nn.Linear(4, 3)
    xi = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for x0, x1, th in zip(xi, target.parameters(), online.parameters()):
        assert torch.equal(x1, torch.lerp(x0, th.detach(), 1.0 - 0.9))  # DynACL's inline update, unchanged
    xi = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, torch.tensor(0.75))
    for x0, x1, th in zip(xi, target.parameters(), online.parameters()):
        torch.testing.assert_close(x1, 0.75 * x0 + 0.25 * th.detach())


def test_cosine_momentum_runs_from_base_to_one() -> None:
    assert cosine_momentum(0.996, 0, 100) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 50, 100) == pytest.approx(0.998)
    assert cosine_momentum(0.996, 100, 100) == pytest.approx(1.0)
    assert float(cosine_momentum(0.996, torch.tensor(25), 100)) == pytest.approx(cosine_momentum(0.996, 25, 100))
    s = MomentumSchedule(0.99, cosine=True)
    s.set_total_steps(10)
    s.step()
    assert float(s.current()) == pytest.approx(cosine_momentum(0.99, 1, 10))
    assert "steps_done" in s.state_dict()  # checkpointed with the model
    assert MomentumSchedule(0.99, cosine=False).current() == 0.99
    head = mlp_head(8, 16, 4)
    assert ([type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
            and head(torch.randn(3, 8)).shape == (3, 4))


# -- adversaries ------------------------------------------------------------------------------------------------
def _trainer(tiny_recipe: Path, tmp_path: Path, name: str, request: pytest.FixtureRequest, *extra: str) -> Trainer:
    from conftest import teacher_overrides

    from rsslctl.base.registry import registry
    cls = registry().get("method", name)
    recipe = load(tiny_recipe, [f"method.name={name!r}", *SMALL, *teacher_overrides(cls, request), *extra])
    return Trainer(recipe, tmp_path / name, quiet=True)


@pytest.mark.parametrize("name, extra", [("rocl", []), ("advcl", ["method.clusters=[2, 3]"]), ("byorl", []),
                                         ("clae", []), ("clae", ["fgsm"]), ("deacl", [])])
def test_adversary_raises_the_loss_it_attacks_inside_its_ball(name: str, extra: list[str], tiny_recipe: Path,
                                                             tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if extra == ["fgsm"]:  # CLAE's own attack: one signed step (the tiny recipe's [attack] table is PGD's)
        tiny_recipe.write_text(tiny_recipe.read_text().replace('name = "pgd"\nsteps = 1', 'name = "fgsm"'))
        assert 'name = "fgsm"' in tiny_recipe.read_text()
        extra = []
    else:
        extra = ["attack.steps=5", *extra]
    trainer = _trainer(tiny_recipe, tmp_path, name, request, *extra)
    method, attack = trainer.method, trainer.method.attack
    seen = []
    real = attack.perturb

    def perturb(x, objective):
        adv = real(x, objective)
        with torch.no_grad():
            seen.append((x, adv, float(objective(x)), float(objective(adv))))
        return adv

    attack.perturb = perturb
    torch.manual_seed(0)
    method.train()
    loss, _ = method.training_step(trainer.train.images[:8], trainer.train.labels[:8])
    assert torch.isfinite(loss) and len(seen) == 1
    x, adv, before, after = seen[0]
    assert (adv - x).abs().max() <= attack.eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert after > before, (before, after)


# -- exact resume of extra state ----------------------------------------------------------------------------------
def test_byorl_target_network_and_momentum_schedule_resume_exactly(tiny_recipe: Path, tmp_path: Path) -> None:
    recipe = load(tiny_recipe, ["method.name='byorl'", "schedule.epochs=2", "data.limit=16", "schedule.batch_size=8",
                                "method.pred_hidden=16", "method.momentum=0.9"])
    train_run(recipe, tmp_path / "full")
    # step 3: epoch 2 = steps 2-3; only epoch 1 is checkpointed
    kill_and_resume(recipe, tmp_path / "broken", 3, reference=tmp_path / "full")
    weights = final_checkpoint(tmp_path / "full")[0]
    assert int(weights["schedule.steps_done"]) == 4
    assert not torch.equal(weights["target.backbone.conv1.weight"], weights["encoder.backbone.conv1.weight"])


def test_deacl_resumes_with_the_teacher_it_started_with(tiny_recipe: Path, tmp_path: Path) -> None:
    """The teacher run trains on between the kill and the resume; the resumed student still distils the saved one."""
    teacher = tmp_path / "teacher"
    t_recipe = load(tiny_recipe, ["method.name='simclr'", "attack.name='none'", *SMALL])
    train_run(t_recipe, teacher)
    recipe = load(tiny_recipe, ["method.name='deacl'", f"method.teacher={str(teacher)!r}", "schedule.epochs=2",
                                "data.limit=16", "schedule.batch_size=8", "attack.steps=1"])
    train_run(recipe, tmp_path / "full")

    def teacher_trains_on(run: Path) -> None:
        assert any(k.startswith("method.teacher.") for k in final_checkpoint(run)[1])
        more = load(tiny_recipe, ["method.name='simclr'", "attack.name='none'", *SMALL[1:], "schedule.epochs=2"])
        Trainer(more, teacher, quiet=True).fit(resume=True)  # the teacher's newest checkpoint is now a different model
        assert latest_checkpoint(teacher).name == "epoch-0002"

    kill_and_resume(recipe, tmp_path / "broken", 3, reference=tmp_path / "full", before_resume=teacher_trains_on)


def test_advcl_run_state_restores_teacher_and_centroids(tiny_recipe: Path, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    a = _trainer(tiny_recipe, tmp_path / "a", "advcl", request, "method.clusters=[2, 3]").method
    b = _trainer(tiny_recipe, tmp_path / "b", "advcl", request, "method.clusters=[2, 3]",
                 "method.kmeans_seed=5").method
    state = a.run_state()
    assert {"centroids.0", "centroids.1"} <= set(state) and any(k.startswith("teacher.") for k in state)
    with torch.no_grad():
        for p in b.teacher.encoder.parameters():
            p.add_(1.0)
    b.load_run_state({k: v.clone() for k, v in state.items()})
    assert_same_tensors(b.run_state(), state)


# -- teacher errors -----------------------------------------------------------------------------------------------
def test_teacher_problems_are_one_line_user_errors(tiny_recipe: Path, tmp_path: Path,
                                                   teacher_run: Path) -> None:
    def build(*extra: str) -> None:
        Trainer(load(tiny_recipe, ["method.name='deacl'", *SMALL, *extra]), tmp_path / "run", quiet=True)

    with pytest.raises(UserError, match="needs a teacher"):
        build()
    with pytest.raises(UserError, match="not found"):
        build(f"method.teacher={str(tmp_path / 'nowhere')!r}")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        build(f"method.teacher={str(tmp_path / 'plain')!r}")
    empty = tmp_path / "untrained"
    recipe = load(tiny_recipe, ["method.name='simclr'", "attack.name='none'"])
    prepare_run_dir(recipe, empty, force=False)
    with pytest.raises(UserError, match="no checkpoint"):
        build(f"method.teacher={str(empty)!r}")
    with pytest.raises(UserError, match="dimensions") as info:
        build(f"method.teacher={str(teacher_run)!r}", "backbone.model_kwargs={channels=[8, 16, 16, 32]}")
    assert "\n" not in str(info.value)


# -- fine-tuning rows ----------------------------------------------------------------------------------------------
def test_robustssl_fine_tuning_rows_of_advcl_deacl_and_rocl() -> None:
    from rsslctl.train.classify import resolve_config
    from rsslctl_plugins.methods.advcl import AdvCL
    from rsslctl_plugins.methods.deacl import DeACL
    from rsslctl_plugins.methods.rocl import RoCL
    for cls, row in ((AdvCL, "AdvCL"), (DeACL, "DeACL")):
        slf = resolve_config("SLF", cls.finetune_rows, row, "CIFAR-10")
        aff = resolve_config("AFF", cls.finetune_rows, row, "CIFAR-10")
        assert (slf.batch_size, slf.lr, slf.milestones) == (512, 0.01, (15, 20))
        assert (aff.batch_size, aff.lr, aff.milestones, aff.dual_bn) == (128, 0.1, (15, 20), False)
        assert resolve_config("ALF", cls.finetune_rows, row, "CIFAR-100").lr == 0.01
    for mode in ("SLF", "ALF", "AFF"):
        cfg = resolve_config(mode, RoCL.finetune_rows, "RoCL", "STL-10 96px")
        assert (cfg.batch_size, cfg.lr, cfg.milestones, cfg.epochs) == (128, 0.1, (15, 20), 25)
        assert cfg.hp_source.startswith("hyper-parameter table: RoCL")
