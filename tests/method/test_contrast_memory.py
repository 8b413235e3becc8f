"""Feature-level and memory-based contrastive adversaries (IFM, HCL, MoCHi, AdCo, CaCo) and the core memory
(rsslctl/memory.py): each loss against its formula written out independently here, each adversary raises the loss it
attacks within its bound, and queue and bank resume bit-identically after a kill."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import final_checkpoint, kill_and_resume, train_run

from rsslctl.method.memory import LearnableBank, NegativeQueue, normalized_rows_grad, softmax_logit_grad
from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load
from rsslctl.train.engine import Trainer
from rsslctl_plugins.methods.adco import adco_logits, adco_loss
from rsslctl_plugins.methods.caco import caco_bank_direction, caco_loss
from rsslctl_plugins.methods.hcl import hcl_loss
from rsslctl_plugins.methods.ifm import ifm_nt_xent
from rsslctl_plugins.methods.mochi import mochi_negatives, moco_loss


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


def partner(a: int) -> int:
    return a + 1 if a % 2 == 0 else a - 1


# -- core memory ------------------------------------------------------------------------------------------------
def test_queue_is_fifo_and_wraps() -> None:
    torch.manual_seed(0)
    queue = NegativeQueue(5, 3)
    expected = list(queue.keys.clone())
    for n in (2, 2, 3, 7):  # wraps twice; the last push is longer than the queue: its newest 5 are kept
        keys = unit(n, 3, seed=n)
        start = int(queue.ptr)
        kept = keys[-5:]
        for i, row in enumerate(kept):
            expected[(start + i) % 5] = row
        queue.push(keys)
        assert int(queue.ptr) == (start + len(kept)) % 5
        assert torch.equal(queue.keys, torch.stack(expected))
    snap = queue.snapshot()
    queue.push(unit(1, 3, seed=9))
    assert not torch.equal(snap, queue.keys)  # the snapshot is a copy


def test_normalized_rows_grad_equals_autograd() -> None:
    q, w = unit(6, 4, seed=1), torch.randn(5, 4, generator=torch.Generator().manual_seed(2)) * 3
    g = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    leaf = w.clone().requires_grad_()
    (g * (q @ F.normalize(leaf, dim=1).t())).sum().backward()
    torch.testing.assert_close(normalized_rows_grad(q, w, g), leaf.grad)
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    leaf = logits.clone().requires_grad_()
    F.cross_entropy(leaf / 0.3, y).backward()
    torch.testing.assert_close(softmax_logit_grad(logits, y, 0.3), leaf.grad)


def test_bank_fill_step_and_optimizer_state() -> None:
    torch.manual_seed(0)
    bank = LearnableBank(4, 3, lr=0.5, momentum=0.9, weight_decay=0.0)
    keys = unit(3, 3, seed=4)
    bank.fill(keys)
    bank.fill(keys)  # only one row was left: the second fill writes keys[0] there and stops
    assert torch.equal(bank.weight[:3], keys) and torch.equal(bank.weight[3], keys[0]) and int(bank.filled) == 4
    before = bank.weight.clone()
    bank.fill(unit(2, 3, seed=5))
    assert torch.equal(bank.weight, before)  # full: no-op
    d = torch.randn(4, 3)
    bank.record(d)
    bank.step()
    torch.testing.assert_close(bank.weight, before + 0.5 * d)  # first SGD step: w − lr·(−d)
    state = bank.run_state("bank")
    assert set(state) == {"bank.0.momentum_buffer"}
    other = LearnableBank(4, 3, lr=0.5, momentum=0.9)
    other.load_state_dict(bank.state_dict())
    other.load_run_state(state, "bank")
    for b in (bank, other):
        b.record(d)
        b.step()
    assert torch.equal(bank.weight, other.weight)  # momentum carried over exactly


# -- IFM --------------------------------------------------------------------------------------------------------
def ifm_formula(z: torch.Tensor, tau: float, eps: float) -> float:
    m, total = z.shape[0], 0.0
    for a in range(m):
        p = partner(a)
        num = math.exp((cos(z[a], z[p]) - eps) / tau)
        den = num + sum(math.exp((cos(z[a], z[b]) + eps) / tau) for b in range(m) if b not in (a, p))
        total += -math.log(num / den)
    return total / m


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_ifm_loss_matches_formula(eps: float) -> None:
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    assert float(ifm_nt_xent(z, 0.5, eps)) == pytest.approx(ifm_formula(z, 0.5, eps), rel=1e-5)


def test_ifm_perturbation_is_the_worst_case_in_its_eps_ball() -> None:
    """Every explicit key perturbation ‖δ‖ ≤ ε gives a loss ≤ IFM's closed form, which exceeds the clean loss."""
    z, tau, eps = unit(6, 4, seed=1), 0.5, 0.2
    worst = float(ifm_nt_xent(z, tau, eps))
    assert worst > float(ifm_nt_xent(z, tau, 0.0))
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        m, total = z.shape[0], 0.0
        for a in range(m):
            delta = torch.randn(m, 4, generator=g)
            delta = eps * delta / delta.norm(dim=1, keepdim=True) * torch.rand(m, 1, generator=g)
            keys = z + delta  # the keys seen by anchor a, each moved by at most ε (not renormalised, as IFM)
            s = (keys @ z[a]) / tau
            s[a] = float("-inf")
            total += float(-(s[partner(a)] - torch.logsumexp(s, 0)))
        assert total / m <= worst + 1e-6


# -- HCL --------------------------------------------------------------------------------------------------------
def hcl_formula(z: torch.Tensor, tau: float, beta: float, tau_plus: float) -> float:
    m, total = z.shape[0], 0.0
    n = m - 2
    for a in range(m):
        p = partner(a)
        pos = math.exp(cos(z[a], z[p]) / tau)
        negs = [math.exp(cos(z[a], z[b]) / tau) for b in range(m) if b not in (a, p)]
        weights = [x ** beta for x in negs]
        reweighted = sum(w * x for w, x in zip(weights, negs)) / (sum(weights) / n)
        ng = max((-tau_plus * n * pos + reweighted) / (1 - tau_plus), n * math.e ** (-1 / tau))
        total += -math.log(pos / (pos + ng))
    return total / m


@pytest.mark.parametrize("beta, tau_plus", [(0.0, 0.0), (1.0, 0.1), (2.0, 0.05)])
def test_hcl_loss_matches_formula(beta: float, tau_plus: float) -> None:
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    assert float(hcl_loss(z, 0.5, beta, tau_plus)) == pytest.approx(hcl_formula(z, 0.5, beta, tau_plus), rel=1e-5)


def test_hcl_hard_weights_raise_the_loss_and_stay_a_distribution() -> None:
    z = unit(10, 6, seed=3)
    losses = [float(hcl_loss(z, 0.5, beta, 0.0)) for beta in (0.0, 0.5, 1.0, 3.0)]
    assert losses == sorted(losses) and losses[-1] > losses[0]  # harder re-weighting, higher loss
    # β = 0, τ⁺ = 0 without the clamp is the plain contrastive loss over the same negatives (NT-Xent)
    from rsslctl.nn.losses import nt_xent
    assert float(hcl_loss(z, 0.5, 0.0, 0.0, clamp=False)) == pytest.approx(float(nt_xent(z, 0.5)), rel=1e-5)


# -- MoCHi ------------------------------------------------------------------------------------------------------
def test_moco_loss_matches_formula() -> None:
    q, k, negs, extra = unit(3, 4, seed=0), unit(3, 4, seed=1), unit(5, 4, seed=2), unit(3, 2, 4, seed=3)
    tau, total = 0.2, 0.0
    for i in range(3):
        pos = math.exp(cos(q[i], k[i]) / tau)
        den = (pos + sum(math.exp(cos(q[i], n) / tau) for n in negs)
               + sum(math.exp(cos(q[i], h) / tau) for h in extra[i]))
        total += -math.log(pos / den)
    assert float(moco_loss(q, k, negs, tau, extra)) == pytest.approx(total / 3, rel=1e-5)


def test_mochi_synthetic_negatives_are_unit_hard_and_raise_the_loss() -> None:
    torch.manual_seed(0)
    q, k, queue = unit(4, 8, seed=0), unit(4, 8, seed=1), unit(64, 8, seed=2)
    synth = mochi_negatives(q, queue, n_hard=8, s1=16, s2=8)
    assert synth.shape == (4, 24, 8) and not synth.requires_grad
    torch.testing.assert_close(synth.norm(dim=2), torch.ones(4, 24))  # on the unit sphere
    hard_sim = (q[:, None] * synth[:, :16]).sum(2).mean()
    assert hard_sim > (q @ queue.t()).mean()  # harder than the average queue negative
    assert moco_loss(q, k, queue, 0.2, synth) > moco_loss(q, k, queue, 0.2)
    # β < 0.5: each query mix is closer to its queue negative than to the query
    mixes = synth[:, 16:]
    assert ((mixes @ queue.t()).max(2).values > (q[:, None] * mixes).sum(2)).all()


# -- AdCo -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_keys", [False, True])
def test_adco_loss_matches_formula(batch_keys: bool) -> None:
    q, k, bank = unit(3, 4, seed=0), unit(3, 4, seed=1), unit(5, 4, seed=2)
    tau, total = 0.12, 0.0
    for i in range(3):
        keys = range(3) if batch_keys else [i]
        den = sum(math.exp(cos(q[i], k[b]) / tau) for b in keys) + sum(math.exp(cos(q[i], n) / tau) for n in bank)
        total += -math.log(math.exp(cos(q[i], k[i]) / tau) / den)
    logits, y = adco_logits(q, k, bank, batch_keys)
    assert float(adco_loss(logits, y, tau)) == pytest.approx(total / 3, rel=1e-5)


def test_adco_bank_ascent_raises_its_loss_on_the_unit_sphere() -> None:
    torch.manual_seed(7)  # bank initialisation: not one of the queries
    q, k = unit(8, 4, seed=0), unit(8, 4, seed=1)
    bank = LearnableBank(16, 4, lr=0.05, momentum=0.0)
    tau_n = 0.02

    def bank_loss() -> float:
        return float(adco_loss(*adco_logits(q, k, bank.vectors()), tau_n))

    before = bank_loss()
    logits, y = adco_logits(q, k, bank.vectors())
    bank.record(normalized_rows_grad(q, bank.weight, softmax_logit_grad(logits, y, tau_n)[:, 1:]))
    bank.step()
    assert bank_loss() > before
    torch.testing.assert_close(bank.vectors().norm(dim=1), torch.ones(16))  # the adversary is used unit-norm


# -- CaCo -------------------------------------------------------------------------------------------------------
def test_caco_loss_matches_formula() -> None:
    q, key, bank = unit(3, 4, seed=0), unit(3, 4, seed=1), unit(6, 4, seed=2)
    tau, total = 0.08, 0.0
    for i in range(3):
        y = max(range(6), key=lambda j: cos(key[i], bank[j]))
        total += -math.log(math.exp(cos(q[i], bank[y]) / tau) / sum(math.exp(cos(q[i], n) / tau) for n in bank))
    loss, _, y = caco_loss(q, key, bank, tau)
    assert float(loss) == pytest.approx(total / 3, rel=1e-5)


def test_caco_bank_pulls_positives_and_pushes_negatives() -> None:
    """One bank step raises the queries' similarity to their (cooperative) positives and, adversarially, the loss
    from the negatives' side; the vectors stay unit-norm."""
    torch.manual_seed(7)  # bank initialisation: not one of the queries
    q, key = unit(6, 5, seed=0), unit(6, 5, seed=1)
    bank = LearnableBank(12, 5, lr=0.05, momentum=0.0)
    _, logits, y = caco_loss(q, key, bank.vectors(), 0.08)
    bank.record(caco_bank_direction(q, bank.weight, logits, y, 0.08))
    bank.step()
    new = q @ bank.vectors().t()
    positives = torch.zeros_like(new, dtype=torch.bool).scatter(1, y[:, None], True)
    assert new.gather(1, y[:, None]).mean() > logits.gather(1, y[:, None]).mean()  # cooperative
    lse = lambda scores: torch.logsumexp(scores.masked_fill(positives, float("-inf")) / 0.08, 1).mean()  # noqa: E731
    assert lse(new) > lse(logits)  # adversarial: the negatives' term of the loss grows
    torch.testing.assert_close(bank.vectors().norm(dim=1), torch.ones(12))


# -- exact resume after a kill (one test per kind of memory) ---------------------------------------------------
@pytest.mark.parametrize("name, options, state_key", [
    ("mochi", ["method.queue_size=40", "method.n_hard=8", "method.s1=4", "method.s2=4"], "queue.keys"),
    ("adco", ["method.bank_size=40"], "bank.weight"),
], ids=["queue", "bank"])
def test_memory_resumes_bit_identically_after_a_kill(name: str, options: list[str], state_key: str,
                                                     tiny_recipe: Path, tmp_path: Path) -> None:
    overrides = [f"method.name={name!r}", "attack.name='none'", "schedule.epochs=3"] + options
    full = tmp_path / "full"
    train_run(load(tiny_recipe, overrides), full)

    def bank_optimizer_saved(run: Path) -> None:
        if name == "adco":  # the bank's optimizer state was saved
            assert final_checkpoint(run)[1]["method.bank.0.momentum_buffer"].abs().max() > 0

    # step 7: 3 steps per epoch, epoch 3 is half done, epochs 1-2 are checkpointed
    kill_and_resume(load(tiny_recipe, overrides), tmp_path / "broken", 7, reference=full,
                    before_resume=bank_optimizer_saved, state_prefix="method.")
    assert state_key in final_checkpoint(full)[0]


def test_mochi_refuses_more_hard_negatives_than_the_queue_holds(tiny_recipe: Path) -> None:
    from rsslctl.base.errors import UserError
    with pytest.raises(UserError, match="n_hard"):
        load(tiny_recipe, ["method.name='mochi'", "attack.name='none'", "method.queue_size=16", "method.n_hard=32"])


def test_adco_symmetric_variant_trains(tiny_recipe: Path, tmp_path: Path) -> None:
    overrides = ["method.name='adco'", "attack.name='none'", "schedule.epochs=1", "method.symmetric=true",
                 "method.bank_size=40"]
    recipe = load(tiny_recipe, overrides)
    trainer = Trainer(recipe, tmp_path / "run", quiet=True)
    prepare_run_dir(recipe, tmp_path / "run", force=False)
    assert math.isfinite(trainer.fit()["loss"]) and int(trainer.method.bank.filled) == 40
