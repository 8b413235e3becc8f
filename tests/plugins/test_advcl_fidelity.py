"""AdvCL against its authors' code (LijieFan/AdvCL), re-derived here from what that code computes: SupConLoss scaled by
τ / base_temperature, ``generate_high``'s mask (distance < r removed), the PGD in train mode with every view in a
forward of its own, and an unclipped random start in the paper recipe."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import teacher_overrides

from rsslctl.base.registry import registry
from rsslctl.run.recipe import load
from rsslctl.train.engine import Trainer
from rsslctl_plugins.methods.advcl import advcl_loss, high_frequency

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def reference_supcon(features: torch.Tensor, tau: float, base: float) -> torch.Tensor:
    """SupConLoss without labels on features [bsz, views, d] (rows already unit length), contrast mode 'all'."""
    bsz, views = features.shape[:2]
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.t() / tau
    logits = logits - logits.max(1, keepdim=True).values.detach()
    mask = torch.eye(bsz, dtype=features.dtype).repeat(views, views)
    not_self = 1 - torch.eye(bsz * views, dtype=features.dtype)
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    return (-(tau / base) * (mask * log_prob).sum(1) / mask.sum(1)).mean()


def test_supcon_term_is_scaled_by_temperature_over_base_temperature() -> None:
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(3, 4, 5, dtype=torch.float64), dim=2)  # 3 images × 4 views
    logits = [torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)]
    labels = [torch.tensor([0, 1, 1]), torch.tensor([3, 0, 2])]
    ce = sum(F.cross_entropy(lg, y) for lg, y in zip(logits, labels)) / 2
    z = feats.flatten(0, 1)  # rsslctl's interleaved rows: image k's views at 4k … 4k+3
    want = reference_supcon(feats, 0.5, 0.07) + 0.2 * ce
    torch.testing.assert_close(advcl_loss(z, logits, labels, 0.5, 0.2).double(), want, atol=1e-6, rtol=1e-6)
    assert 0.5 / 0.07 > 7  # the reference's contrastive term is 7.14 × NT-Xent ...
    unscaled = reference_supcon(feats, 0.5, 0.5) + 0.2 * ce  # ... and base_temperature = τ removes the factor
    torch.testing.assert_close(advcl_loss(z, logits, labels, 0.5, 0.2, base_temperature=0.5).double(), unscaled,
                               atol=1e-6, rtol=1e-6)


def reference_high(images: np.ndarray, r: float) -> np.ndarray:
    """``generate_high``: mask[i, j] = 1 where √((i − H/2)² + (j − H/2)²) < r, spectrum × (1 − mask)."""
    size = images.shape[-2]
    mask = np.array([[1.0 if math.sqrt((i - size / 2) ** 2 + (j - size / 2) ** 2) < r else 0.0
                      for j in range(images.shape[-1])] for i in range(size)])
    flat = images.reshape(-1, *images.shape[-2:])
    fd = np.fft.fftshift(np.fft.fftn(flat, axes=(-2, -1))) * (1 - mask)  # the reference shifts every axis
    return np.real(np.fft.ifftn(np.fft.ifftshift(fd), axes=(-2, -1))).reshape(images.shape)


def test_high_frequency_filter_is_the_references_including_the_bins_at_exactly_r() -> None:
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32)
    want = reference_high(x.double().numpy(), 8)
    torch.testing.assert_close(high_frequency(x, 8.0).double(), torch.from_numpy(want), atol=1e-5, rtol=1e-5)
    # a pure cosine at 8 bins from zero frequency (one of the four bins at exactly r) passes unchanged
    i = torch.arange(32, dtype=torch.float32)
    wave = torch.cos(2 * math.pi * 8 * i / 32).view(1, 1, 32, 1).expand(1, 1, 32, 32)
    torch.testing.assert_close(high_frequency(wave, 8.0), wave, atol=1e-5, rtol=0)
    inside = torch.cos(2 * math.pi * 7 * i / 32).view(1, 1, 32, 1).expand(1, 1, 32, 32)
    assert high_frequency(inside, 8.0).abs().max() < 1e-5  # distance 7 < r: removed


def _advcl(tiny_recipe: Path, tmp_path: Path, request: pytest.FixtureRequest, *extra: str) -> Trainer:
    overrides = ["method.name='advcl'", "schedule.epochs=1", "data.limit=16", "schedule.batch_size=8",
                 "schedule.warmup_epochs=0", "attack.steps=2", "method.clusters=[2, 3]",
                 *teacher_overrides(registry().get("method", "advcl"), request), *extra]
    return Trainer(load(tiny_recipe, overrides), tmp_path / "run", quiet=True)


def reference_total(method, x_cl, x_ce, views, pseudo, ce_sum: bool) -> torch.Tensor:
    """The reference's total: each input in its own forward (x̃_cl, x̃_ce through the adversarial BN, x₁, x₂, x_HFC
    through the normal one), SupConLoss(τ 0.5, base 0.07) + 0.2 × the cross-entropy over the 5 heads / 5 (summed over
    the batch inside the reference's attack, averaged in its training step)."""
    enc = method.encoder
    feats = torch.stack([F.normalize(enc(x_cl, "pgd"), dim=1)] + [F.normalize(enc(v, "normal"), dim=1)
                                                                   for v in views], dim=1)
    f_ce = enc.features(x_ce, "pgd")
    ce = sum(F.cross_entropy(head(f_ce), y, reduction="sum" if ce_sum else "mean")
             for head, y in zip(method.heads, pseudo)) / len(pseudo)
    return reference_supcon(feats, 0.5, 0.07) + 0.2 * ce


@pytest.mark.parametrize("attack_bn", ["train", "eval"])
def test_attack_and_loss_use_the_references_batch_statistics(attack_bn: str, tiny_recipe: Path, tmp_path: Path,
                                                             request: pytest.FixtureRequest) -> None:
    method = _advcl(tiny_recipe, tmp_path, request, f"method.attack_bn={attack_bn!r}").method
    seen: dict = {}
    method.augment.register_forward_hook(lambda module, args, out: seen.setdefault("views", out))
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    n, pseudo = len(images), method.pseudo_labels(images)
    real = method.attack.perturb

    def reference_grad(x: torch.Tensor) -> torch.Tensor:
        leaf = x.clone().requires_grad_(True)
        views = (seen["views"][0::2], seen["views"][1::2], high_frequency(x[:n], 8.0))
        return torch.autograd.grad(reference_total(method, leaf[:n], leaf[n:], views, pseudo, ce_sum=True), leaf)[0]

    def perturb(x, objective):
        seen["training"] = method.encoder.training
        leaf = x.clone().requires_grad_(True)
        ours = torch.autograd.grad(objective(leaf), leaf)[0]
        # the attack's gradient is the reference's in the same BN mode (its batch-summed CE: the mean's gradient × N)
        want = reference_grad(x)
        torch.testing.assert_close(ours[:n], want[:n], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(ours[n:] * n, want[n:], atol=1e-6, rtol=1e-4)
        if attack_bn == "train":  # with running statistics the gradient would be another one
            method.eval()
            assert not torch.allclose(want, reference_grad(x), atol=1e-6, rtol=1e-3)
            method.train()
        seen["x"] = x
        seen["adv"] = real(x, objective)
        return seen["adv"]

    method.attack.perturb = perturb
    method.train()
    loss, _ = method.training_step(images, torch.zeros(6, dtype=torch.long))
    assert seen["training"] is (attack_bn == "train")
    views = (seen["views"][0::2], seen["views"][1::2], high_frequency(seen["x"][:n], 8.0))
    # the training loss: train mode, every view in its own forward
    method.train()
    with torch.no_grad():
        adv = seen["adv"]
        want = reference_total(method, adv[:n], adv[n:], views, pseudo, ce_sum=False)
        joint = method.encoder(torch.cat(views), "normal").view(3, n, -1)  # one 3N forward: other BN statistics
        assert not torch.allclose(joint[0], method.encoder(views[0], "normal"), atol=1e-5)
    torch.testing.assert_close(loss.detach(), want, atol=1e-5, rtol=1e-5)


def test_paper_recipe_keeps_the_references_settings_and_unclipped_start() -> None:
    recipe = load(RECIPES / "advcl.toml")
    m = recipe.method.options
    assert (m.temperature, m.base_temperature, m.attack_bn, m.radius, m.ce_weight) == (0.5, 0.07, "train", 8.0, 0.2)
    assert recipe.attack.options.clamp_start is False
