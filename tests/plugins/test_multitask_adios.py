"""The multi-task method (weighted sum of registered methods' losses) and ADIOS (adversarially learned masks)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_tensors, final_checkpoint, kill_and_resume, train_run

from rsslctl.base.errors import UserError
from rsslctl.run.build import build_method
from rsslctl.run.recipe import load

CPU = torch.device("cpu")
NO_ATTACK = ["attack.name='none'"]
THREE = ["method.name='multitask'",
         "method.tasks={simclr={weight=1.0}, rotation={weight=0.5}, jigsaw={weight=0.25, grid=2}}"]
ADIOS = ["method.name='adios'", "method.num_masks=3", "method.mask_width=4"]


def _method(tiny_recipe: Path, overrides: list[str]):
    torch.manual_seed(0)
    return build_method(load(tiny_recipe, NO_ATTACK + overrides), CPU)


def _images(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=g))


# -- multitask -------------------------------------------------------------------------------------------------------
def test_multitask_loss_is_the_weighted_sum_of_each_tasks_own_loss(tiny_recipe: Path) -> None:
    method = _method(tiny_recipe, THREE)
    images, labels = _images()
    torch.manual_seed(5)
    total, metrics = method.training_step(images, labels)
    torch.manual_seed(5)  # the same random views, task by task, each method on its own
    own = {name: task.training_step(images, labels)[0] for name, task in method.tasks.items()}
    expected = 1.0 * own["simclr"] + 0.5 * own["rotation"] + 0.25 * own["jigsaw"]
    assert torch.allclose(total, expected, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(metrics[f"{k}_loss"], v) for k, v in own.items())
    total.backward()  # every task's head and the shared encoder receive gradients
    assert method.tasks["rotation"].classifier.weight.grad.abs().sum() > 0
    assert method.tasks["jigsaw"].classifier.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.encoder.head.parameters())


def test_multitask_heads_do_not_collide_and_the_encoder_is_stored_once(tiny_recipe: Path) -> None:
    method = _method(tiny_recipe, THREE)
    state = method.state_dict()
    assert not [k for k in state if k.startswith("tasks.") and ".encoder." in k]
    # pretext heads sit on the backbone features, the projection head belongs to SimCLR alone
    assert method.tasks["rotation"].classifier.in_features == method.encoder.num_features
    assert method.encoder.out_dim != method.encoder.num_features
    fresh = _method(tiny_recipe, THREE)
    fresh.load_state_dict(state)  # strict: the tasks' shared references are filled from encoder.*
    assert fresh.tasks["simclr"].encoder is fresh.encoder
    assert torch.equal(fresh.tasks["rotation"].classifier.weight, method.tasks["rotation"].classifier.weight)


@pytest.mark.parametrize("tasks, message", [
    ("{simclr={weight=1}, acl={weight=1}}", "both train the encoder's projection head"),
    ("{simclr={weight=0}, rotation={weight=0}}", "weights sum to 0"),
    ("{sat={weight=1}}", "attack: method.tasks.sat trains adversarially and needs an attack"),
    ("{simclr={temprature=1}}", "method.tasks.simclr: unknown key 'temprature' (did you mean 'temperature'?)"),
    ("{simclr={weight=1}, again={method='simclr'}}", "method.tasks.again: duplicate task: method 'simclr'"),
    ("{}", "method.tasks: no tasks"),
    ("{rotaton={weight=1}}", "method.tasks.rotaton: unknown method 'rotaton' (did you mean 'rotation'?)"),
    ("{simclr={weight=-1}}", "method.tasks.simclr.weight: -1.0 must be ≥ 0"),
    ("{inner={method='multitask'}}", "cannot be one of its own tasks"),
])
def test_multitask_refuses_bad_task_tables_in_one_line(tiny_recipe: Path, tasks: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        load(tiny_recipe, NO_ATTACK + ["method.name='multitask'", f"method.tasks={tasks}"])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_multitask_resolved_recipe_records_every_tasks_options(tiny_recipe: Path) -> None:
    recipe = load(tiny_recipe, NO_ATTACK + THREE)
    tasks = recipe.resolved["method"]["tasks"]
    assert tasks["simclr"] == {"weight": 1.0, "temperature": 0.5}
    assert tasks["jigsaw"]["permutations"] == 24
    assert load(tiny_recipe, NO_ATTACK + ["method.name='multitask'", f"method.tasks={_toml(tasks)}"]).resolved == \
        recipe.resolved


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_toml(v)}" for k, v in value.items()) + "}"
    return repr(value) if not isinstance(value, str) else f"'{value}'"


# -- ADIOS -----------------------------------------------------------------------------------------------------------
def _nt_xent_by_hand(z: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR loss for interleaved pairs (rows 2i, 2i+1), written out anchor by anchor."""
    z = F.normalize(z.float(), dim=1)
    terms = []
    for a in range(len(z)):
        p = a + 1 if a % 2 == 0 else a - 1
        others = torch.stack([z[a] @ z[b] / tau for b in range(len(z)) if b != a])
        terms.append(-(z[a] @ z[p] / tau - torch.logsumexp(others, 0)))
    return torch.stack(terms).mean()


def test_adios_masks_are_a_partition_and_the_loss_matches_the_formula(tiny_recipe: Path) -> None:
    from rsslctl_plugins.methods.adios import sparsity_penalty
    method = _method(tiny_recipe, ADIOS).eval()
    torch.manual_seed(2)
    v1, v2 = torch.rand(6, 3, 16, 16), torch.rand(6, 3, 16, 16)
    masks = method.occluder(v2)
    assert masks.shape == (6, 3, 16, 16) and masks.min() >= 0 and masks.max() <= 1
    assert torch.allclose(masks.sum(1), torch.ones(6, 16, 16), atol=1e-5)
    with torch.no_grad():
        expected = 0.0
        for k in range(3):
            masked = v2 * (1 - masks[:, k:k + 1])
            z1, z2 = method.encoder(v1), method.encoder(masked)  # eval mode: batch composition does not matter
            expected += _nt_xent_by_hand(torch.stack([z1, z2], 1).flatten(0, 1), method.options.temperature)
        got = method.ssl_loss(v1, v2, masks)
    assert torch.allclose(got, expected, rtol=1e-4)
    s = masks.detach().mean(dim=(2, 3))  # [B, N]
    penalty = sum(sum(1 / (math.sin(math.pi * float(s[b, k])) + 1e-10) for b in range(6)) / 6 for k in range(3))
    assert math.isclose(float(sparsity_penalty(masks.detach())), penalty, rel_tol=1e-5)


@pytest.mark.parametrize("update, form", [("alternating", "simclr"), ("simultaneous", "simclr"),
                                          ("alternating", "byol")])
def test_adios_occluder_raises_the_loss_it_attacks_and_leaves_the_encoder_alone(tiny_recipe: Path, update: str,
                                                                               form: str) -> None:
    method = _method(tiny_recipe, ADIOS + ["method.sparsity_weight=0", "method.mask_lr=0.5",
                                           f"method.update='{update}'", f"method.form='{form}'"]).eval()
    torch.manual_seed(3)
    v1, v2 = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    encoder = {k: v.clone() for k, v in method.encoder.state_dict().items()}
    with torch.no_grad():
        before = method.ssl_loss(v1, v2, method.occluder(v2))
    for _ in range(5):
        if update == "alternating":
            method._pending = (v1, v2)
            method.occluder_step()  # (not after_optimizer_step: the BYOL target's EMA would move the loss too)
        else:  # what the engine does: backward of the returned loss, then after_optimizer_step
            reversed_masks = 2 * method.occluder(v2).detach() - method.occluder(v2)
            method.ssl_loss(v1, v2, reversed_masks).backward()
            method.encoder.zero_grad(set_to_none=True)
            method.after_optimizer_step()
    with torch.no_grad():
        after = method.ssl_loss(v1, v2, method.occluder(v2))
    assert float(after) > float(before)
    assert_same_tensors(method.encoder.state_dict(), encoder)
    assert {id(p) for p in method.occluder.parameters()}.isdisjoint({id(p) for p in method.optimizer_parameters()})


@pytest.mark.parametrize("form", ["simclr", "byol"])
def test_adios_occluder_and_its_optimizer_resume_exactly(tiny_recipe: Path, form: str) -> None:
    images, labels = _images()
    a = _method(tiny_recipe, ADIOS + [f"method.form='{form}'"])
    for _ in range(2):
        a.training_step(images, labels)
        a.after_optimizer_step()
    run_state = {k: v.clone() for k, v in a.run_state().items()}
    assert any(k.endswith("momentum_buffer") for k in run_state)
    b = _method(tiny_recipe, ADIOS + [f"method.form='{form}'"])
    b.load_state_dict(a.state_dict())
    b.load_run_state(run_state)
    for m in (a, b):
        torch.manual_seed(9)
        m.training_step(images, labels)
        m.after_optimizer_step()
    assert_same_tensors(a.state_dict(), b.state_dict())  # occluder, encoder, BYOL target


def test_multitask_with_adios_resumes_exactly_after_a_kill(tiny_recipe: Path, tmp_path: Path) -> None:
    """The tasks' extra state (ADIOS's occluder optimizer) goes through the multi-task run state."""
    overrides = NO_ATTACK + ["method.name='multitask'", "data.limit=32", "schedule.batch_size=16",
                             "schedule.epochs=2", "method.tasks={adios={num_masks=2, mask_width=4}, rotation={}}"]
    train_run(load(tiny_recipe, overrides), tmp_path / "full")

    def occluder_optimizer_saved(run: Path) -> None:
        assert any(k.startswith("method.adios.mask_optimizer.") for k in final_checkpoint(run)[1])

    # step 3: epoch 2 (steps 2-3) not checkpointed
    kill_and_resume(load(tiny_recipe, overrides), tmp_path / "broken", 3, reference=tmp_path / "full",
                    before_resume=occluder_optimizer_saved, state_prefix="method.")


def test_multitask_follows_its_tasks_for_dual_bn_and_their_own_optimizers(tiny_recipe: Path) -> None:
    torch.manual_seed(0)
    robust = build_method(load(tiny_recipe, ["method.name='multitask'",
                                             "method.tasks={acl={weight=1}, rotation={weight=1}}"]), CPU)
    assert robust.encoder.dual_bn and robust.attack is not None  # ACL asks for dual BN under dual_bn = "auto"
    method = _method(tiny_recipe, ["method.name='multitask'", "method.tasks={adios={num_masks=2, mask_width=4}, "
                                   "rotation={weight=1}}"])
    engine = {id(p) for p in method.optimizer_parameters()}
    assert engine.isdisjoint(id(p) for p in method.tasks["adios"].occluder.parameters())
    assert {id(p) for p in method.encoder.parameters()} <= engine
    assert {id(p) for p in method.tasks["rotation"].classifier.parameters()} <= engine


def test_adios_byol_form_matches_the_formula_and_its_target_follows_by_ema(tiny_recipe: Path) -> None:
    method = _method(tiny_recipe, ADIOS + ["method.form='byol'", "method.momentum=0.9"]).eval()
    torch.manual_seed(4)
    v1, v2 = torch.rand(6, 3, 16, 16), torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        masks = method.occluder(v2)
        expected = 0.0
        for k in range(3):
            masked = v2 * (1 - masks[:, k:k + 1])
            for a, b in ((v1, masked), (masked, v1)):  # online prediction of one view vs the target of the other
                p, t = method.predictor(method.encoder(a)), method.target(b)
                cos = torch.stack([p[i] @ t[i] / (p[i].norm() * t[i].norm()) for i in range(6)])
                expected += (2 - 2 * cos).mean()
        assert torch.allclose(method.ssl_loss(v1, v2, masks), expected, rtol=1e-4)
    online = [p.detach().clone() for p in method.encoder.parameters()]
    before = [p.detach().clone() for p in method.target.parameters()]
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)
    method.after_optimizer_step()
    for t, t0, o in zip(method.target.parameters(), before, online):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * (o + 1.0), atol=1e-6)
    assert not any(p.requires_grad for p in method.target.parameters())
