"""SimCLR and ACL plugins: loss composition and dual-BN routing."""
from __future__ import annotations

import copy

import timm
import torch

from rsslctl.adversary.attack import Attack
from rsslctl.nn.encoder import Encoder, EncoderOptions, apply_cifar_stem
from rsslctl.nn.losses import nt_xent, pair_rows
from rsslctl_plugins.methods.acl import ACL, ACLOptions
from rsslctl_plugins.methods.simclr import SimCLR, SimCLROptions


class ShiftAttack(Attack):
    """Deterministic stand-in for PGD: records the model mode/route it saw, returns x + 0.01."""

    name = "shift"

    def __init__(self, encoder: Encoder) -> None:
        super().__init__(None)
        self.encoder, self.seen = encoder, []

    def perturb(self, x, objective):
        objective(x)  # the attack objective must run in eval mode through the pgd route
        self.seen.append((self.encoder.training, self.encoder._route, x.shape[0]))
        return (x + 0.01).clamp(0, 1)


def make(dual: bool = True) -> Encoder:
    torch.manual_seed(0)
    backbone = apply_cifar_stem(timm.create_model("resnet18", num_classes=0, channels=(8, 8, 8, 8)))
    return Encoder(backbone, EncoderOptions(head_layers=2, head_dim=16), dual_bn=dual)


def fixed_views(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255  # identity augmentation so the test can recompute the loss


def stats(enc: Encoder, route: int) -> torch.Tensor:
    return enc.backbone.bn1.bn_list[route].running_mean.clone()


def test_acl_ds_loss_and_bn_routing() -> None:
    enc = make()
    attack = ShiftAttack(enc)
    method = ACL(ACLOptions(weight=0.2), enc, attack, fixed_views).train()
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    before = (stats(enc, 0), stats(enc, 1))
    twin = copy.deepcopy(enc)  # recomputes both terms independently, in train mode like the step
    loss, metrics = method.training_step(images, torch.zeros(6, dtype=torch.long))
    assert attack.seen == [(False, 1, 12)]  # eval mode, pgd route, both views attacked jointly
    assert enc.training  # mode restored after the attack
    assert not torch.equal(before[0], stats(enc, 0)) and not torch.equal(before[1], stats(enc, 1))
    expected = 0.5 * (0.8 * metrics["loss_nat"] + 1.2 * metrics["loss_adv"])
    assert torch.allclose(loss, expected)
    views = fixed_views(images.repeat_interleave(2, 0))
    assert torch.allclose(metrics["loss_nat"], nt_xent(twin(views, "normal"), 0.5), atol=1e-5)
    assert torch.allclose(metrics["loss_adv"], nt_xent(twin((views + 0.01).clamp(0, 1), "pgd"), 0.5), atol=1e-5)


def test_acl_a2a_only_adversarial_stream_trains_its_bn() -> None:
    enc = make()
    method = ACL(ACLOptions(variant="a2a"), enc, ShiftAttack(enc), fixed_views).train()
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    before = (stats(enc, 0), stats(enc, 1))
    loss, metrics = method.training_step(images, torch.zeros(4, dtype=torch.long))
    assert set(metrics) == {"loss_adv"} and torch.equal(loss.detach(), metrics["loss_adv"])
    assert torch.equal(before[0], stats(enc, 0))  # clean BN untouched: no clean forward in train mode
    assert not torch.equal(before[1], stats(enc, 1))


def test_acl_a2s_attacks_one_view_and_pairs_it_with_the_clean_view() -> None:
    enc = make()
    attack = ShiftAttack(enc)
    method = ACL(ACLOptions(variant="a2s"), enc, attack, fixed_views).train()
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    loss, _ = method.training_step(images, torch.zeros(4, dtype=torch.long))
    assert attack.seen[0][:2] == (False, 1) and attack.seen[0][2] == 4  # only the even views
    enc.eval()  # recompute with frozen statistics: adversarial even view (pgd BN) vs clean odd view (normal BN)
    views = fixed_views(images.repeat_interleave(2, 0))
    adv = (views[0::2] + 0.01).clamp(0, 1)
    expected = nt_xent(pair_rows(enc(adv, "pgd"), enc(views[1::2], "normal")), 0.5)
    method.eval()
    with torch.no_grad():
        again, _ = method.training_step(images, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(again, expected, atol=1e-5)


def test_simclr_loss_is_nt_xent_of_the_two_views() -> None:
    enc = make(dual=False)
    method = SimCLR(SimCLROptions(temperature=0.3), enc, None, fixed_views).eval()
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    loss, _ = method.training_step(images, torch.zeros(5, dtype=torch.long))
    z = enc(fixed_views(images.repeat_interleave(2, 0)))
    assert torch.allclose(loss, nt_xent(z, 0.3))
    # identical views are the easiest positives: the loss is below that of shuffled pairs
    perm = torch.randperm(10)
    assert loss < nt_xent(z[perm], 0.3)
