"""DeACL against its authors' code (pantheon5100/DeACL), re-derived here from what that code computes, and the unclipped
random start of the DeACL and AdvCL references kept by their paper recipes (and clipped with the switch)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import teacher_overrides

from rsslctl.base.registry import registry
from rsslctl.run.recipe import load
from rsslctl.train.engine import Trainer

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _first_forward_input(attack, x: torch.Tensor) -> torch.Tensor:
    seen = []

    def objective(xa: torch.Tensor) -> torch.Tensor:
        if not seen:
            seen.append(xa.detach().clone())
        return xa.sum()

    adv = attack.perturb(x, objective)
    assert (adv - x).abs().max() <= attack.eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    return seen[0]


@pytest.mark.parametrize("name", ["deacl", "advcl"])
def test_paper_recipe_starts_unclipped_and_the_switch_clips(name: str, tmp_path: Path) -> None:
    recipe = RECIPES / f"{name}.toml"
    x = torch.cat((torch.zeros(4, 3, 8, 8), torch.ones(4, 3, 8, 8)))  # pixels at both ends of [0, 1]
    torch.manual_seed(0)
    start = _first_forward_input(load(recipe).attack.build(), x)
    eps = 8 / 255
    assert start.min() < -eps / 2 and start.max() > 1 + eps / 2  # x + U[−ε, ε], not clipped (the reference)
    assert (start - x).abs().max() <= eps + 1e-6
    torch.manual_seed(0)
    clipped = _first_forward_input(load(recipe, ["attack.clamp_start=true"]).attack.build(), x)
    assert clipped.min() >= 0 and clipped.max() <= 1
    torch.testing.assert_close(clipped, start.clamp(0, 1))


def test_training_step_is_the_references(tiny_recipe: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    overrides = ["method.name='deacl'", "schedule.epochs=1", "data.limit=16", "schedule.batch_size=8",
                 "schedule.warmup_epochs=0", "attack.steps=2", "encoder.head_layers=0",
                 *teacher_overrides(registry().get("method", "deacl"), request)]
    method = Trainer(load(tiny_recipe, overrides), tmp_path / "run", quiet=True).method
    student, seen = method.encoder, {}
    real = method.attack.perturb

    def perturb(x, objective):
        seen["training"] = student.training
        leaf = x.clone().requires_grad_(True)
        ours = torch.autograd.grad(objective(leaf), leaf)[0]
        ref_leaf = x.clone().requires_grad_(True)  # reference: −cos(student(x̃), teacher(x)).sum() × 256, eval mode
        ref = -F.cosine_similarity(student.features(ref_leaf), method.teacher.features(x), dim=1).sum() * 256
        torch.testing.assert_close(ours * 256, torch.autograd.grad(ref, ref_leaf)[0], atol=1e-6, rtol=1e-4)
        seen["x"], seen["adv"] = x, real(x, objective)
        return seen["adv"]

    method.attack.perturb = perturb
    method.train()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    loss, _ = method.training_step(images, torch.zeros(6, dtype=torch.long))
    assert seen["training"] is False  # the reference attacks in eval mode
    x, adv = seen["x"], seen["adv"]
    with torch.no_grad():  # reference: one train-mode forward of [x; x̃], −cos(f(x), t(x)) − 2·cos(f(x̃), f(x))
        f = student.features(torch.cat((x, adv)))
        clean, ae = f[:6], f[6:]
        t = method.teacher.features(x)
        want = -F.cosine_similarity(clean, t).mean() - 2 * F.cosine_similarity(ae, clean).mean()
    torch.testing.assert_close(loss.detach(), want, atol=1e-5, rtol=1e-5)
