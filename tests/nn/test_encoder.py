"""Encoder: timm backbone with CIFAR stem, ACL head, dual BN routing and single-BN export."""
from __future__ import annotations

import pytest
import timm
import torch
from conftest import assert_same_tensors
from torch import nn

from rsslctl.base.errors import UserError
from rsslctl.base.options import validate
from rsslctl.nn.encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DualBatchNorm,
    Encoder,
    EncoderOptions,
    apply_cifar_stem,
    build_encoder,
    single_bn_state,
)
from rsslctl_plugins.backbones.timm_backbone import TimmBackbone, TimmOptions

KWARGS = {"channels": [8, 16, 32, 64]}
TIMM_KWARGS = {"channels": (8, 16, 32, 64)}


def backbone_plugin(**kw) -> TimmBackbone:
    values = {"model": "resnet18", "model_kwargs": KWARGS, **kw}
    return TimmBackbone(validate(TimmOptions, values, "backbone"))


def encoder(dual: bool = True, seed: int = 0, **kw) -> Encoder:
    torch.manual_seed(seed)
    return build_encoder(backbone_plugin(), EncoderOptions(**kw), method_wants_dual_bn=dual)


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def stats(module: nn.Module, route_index: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()
            if f"bn_list.{route_index}." in k and ("running" in k or "num_batches" in k)}


def test_cifar_stem_keeps_resolution():
    model = backbone_plugin().build()
    assert isinstance(model.conv1, nn.Conv2d)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    assert model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    seen = {}
    model.layer1.register_forward_hook(lambda m, i, o: seen.update(layer1=o.shape))
    out = model.eval()(images())
    assert seen["layer1"][-2:] == (32, 32)
    assert out.shape == (4, model.num_features) == (4, 64)


def test_stem_width_builds_the_papers_cifar_resnet():
    """timm keeps a 64-wide stem (and a 1×1 projection 64 → 8 in layer1); stem_width = the first stage width builds
    the CIFAR ResNet whose convolutions are exactly 3→8, 8→8 … (no projection before layer2)."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(model: nn.Module) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.eval()(images(n=1))
        return counter.get_total_flops()

    default, narrow = backbone_plugin().build(), backbone_plugin(stem_width=8).build()
    assert default.conv1.out_channels == 64 and default.layer1[0].downsample is not None
    assert narrow.conv1.out_channels == 8 and narrow.bn1.num_features == 8 and narrow.layer1[0].downsample is None
    convs = [m for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    size = {8: 32, 16: 16, 32: 8, 64: 4}  # output resolution of each stage width at 32 px
    by_hand = sum(2 * c.in_channels * c.out_channels * c.kernel_size[0] * c.kernel_size[1] * size[c.out_channels] ** 2
                  for c in convs)
    assert flops(narrow) == by_hand < flops(default)
    assert narrow(images()).shape == (4, 64)
    with pytest.raises(UserError, match="stem_width applies to the CIFAR stem"):
        backbone_plugin(cifar_stem=False, stem_width=8).build()


def test_without_cifar_stem_downsamples_by_four():
    model = backbone_plugin(cifar_stem=False).build()
    assert model.conv1.stride == (2, 2) and not isinstance(model.maxpool, nn.Identity)
    seen = {}
    model.layer1.register_forward_hook(lambda m, i, o: seen.update(layer1=o.shape))
    model.eval()(images())
    assert seen["layer1"][-2:] == (8, 8)


def test_acl_head_layout():
    enc = encoder(dual=False, head_layers=3)
    types = [type(m) for m in enc.head]
    assert types == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    linears = [m for m in enc.head if isinstance(m, nn.Linear)]
    assert [m.bias is not None for m in linears] == [True, False, False]
    assert all(m.in_features == m.out_features == 64 for m in linears)
    assert enc.out_dim == 64
    assert enc.eval()(images()).shape == (4, 64)


def test_head_widths_and_no_head():
    enc = encoder(dual=False, head_layers=2, head_hidden=32, head_dim=16)
    linears = [m for m in enc.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 16)]
    assert isinstance(enc.head[-1], nn.BatchNorm1d)  # no ReLU at the end
    assert enc.out_dim == 16 and enc.eval()(images()).shape == (4, 16)
    enc0 = encoder(dual=False, head_layers=0)
    assert isinstance(enc0.head, nn.Identity) and enc0.out_dim == 64
    assert enc0.eval()(images()).shape == (4, 64)


def test_dual_bn_replaces_every_batch_norm():
    plain = backbone_plugin().build()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    enc = encoder(dual=True)
    duals = [m for m in enc.modules() if isinstance(m, DualBatchNorm)]
    assert len(duals) == n_bn + 3  # backbone BNs + three head BNs
    # no plain BN left outside a DualBatchNorm
    inner = {id(bn) for d in duals for bn in d.bn_list}
    others = [m for m in enc.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in inner]
    assert others == []
    keys = list(enc.state_dict())
    for key in plain.state_dict():
        if key.rsplit(".", 1)[0] in {n for n, m in plain.named_modules() if isinstance(m, nn.BatchNorm2d)}:
            prefix, leaf = key.rsplit(".", 1)
            assert f"backbone.{prefix}.bn_list.0.{leaf}" in keys and f"backbone.{prefix}.bn_list.1.{leaf}" in keys
            assert f"backbone.{key}" not in keys
        else:
            assert f"backbone.{key}" in keys  # conv weights: one copy, shared by both routes
    assert "backbone.bn1.bn_list.0.weight" in keys and "backbone.layer1.0.bn2.bn_list.1.running_var" in keys
    assert "head.1.bn_list.0.weight" in keys and "head.7.bn_list.1.bias" in keys
    assert not any(".bn_list.2." in k for k in keys)


def test_dual_bn_auto_on_off():
    assert encoder(dual=True, dual_bn="auto").dual_bn
    assert not encoder(dual=False, dual_bn="auto").dual_bn
    assert encoder(dual=False, dual_bn="on").dual_bn
    enc = encoder(dual=True, dual_bn="off")
    assert not enc.dual_bn and not any(isinstance(m, DualBatchNorm) for m in enc.modules())


@pytest.mark.parametrize("route,used,unused", [("pgd", 1, 0), ("normal", 0, 1)])
def test_route_updates_only_its_bn(route, used, unused):
    enc = encoder().train()
    before_used, before_unused = stats(enc, used), stats(enc, unused)
    assert before_used and before_unused
    enc(images(), route)
    after_used, after_unused = stats(enc, used), stats(enc, unused)
    assert_same_tensors(after_unused, before_unused)
    changed = [k for k, v in before_used.items() if not torch.equal(after_used[k], v)]
    assert len(changed) == len(before_used)  # every BN of the route (running stats and counter) moved


def test_routes_share_conv_weights_but_not_bn_affine():
    enc = encoder().train()
    enc(images(), "pgd").square().sum().backward()
    assert enc.backbone.conv1.weight.grad is not None and enc.backbone.layer4[1].conv2.weight.grad is not None
    assert enc.head[0].weight.grad is not None
    for d in (m for m in enc.modules() if isinstance(m, DualBatchNorm)):
        assert d.bn_list[1].weight.grad is not None
        assert d.bn_list[0].weight.grad is None
    # the same conv weight feeds both routes: changing it changes both outputs
    enc.eval()
    x = images()
    with torch.no_grad():
        a0, a1 = enc(x, "normal"), enc(x, "pgd")
        enc.backbone.conv1.weight.mul_(-1)
        b0, b1 = enc(x, "normal"), enc(x, "pgd")
    assert not torch.allclose(a0, b0) and not torch.allclose(a1, b1)


def test_routes_give_different_outputs_after_divergent_bn():
    enc = encoder()
    with torch.no_grad():
        for d in (m for m in enc.modules() if isinstance(m, DualBatchNorm)):
            d.bn_list[1].bias.add_(0.5)
    enc.eval()
    x = images()
    with torch.no_grad():
        assert not torch.allclose(enc.features(x, "normal"), enc.features(x, "pgd"))
        torch.testing.assert_close(enc.features(x, "normal"), enc.features(x, "normal"))
    with pytest.raises(ValueError):
        enc(x, "adv")


def test_default_normalisation_is_imagenet():
    enc = encoder(dual=False).eval()
    assert torch.allclose(enc.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(enc.std.flatten(), torch.tensor(IMAGENET_STD))
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    x = images()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(enc.features(x), enc.backbone((x - mean) / std))
        assert not torch.allclose(enc.features(x), enc.backbone(x), atol=1e-3)
    custom = encoder(dual=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    with torch.no_grad():
        torch.testing.assert_close(custom.features(x), custom.backbone((x - 0.5) / 0.25))


def test_single_bn_state_loads_into_plain_timm_and_matches_pgd_route():
    enc = encoder()
    # make the two routes differ: train-mode forwards through each, and distinct affine parameters
    enc.train()
    with torch.no_grad():
        enc(images(seed=1), "normal")
        enc(images(seed=2) * 0.5, "pgd")
        enc(images(seed=3) * 0.5 + 0.5, "pgd")
        for d in (m for m in enc.backbone.modules() if isinstance(m, DualBatchNorm)):
            d.bn_list[1].weight.mul_(1.5)
            d.bn_list[0].bias.add_(0.3)
    for route in ("pgd", "normal"):
        state = single_bn_state(enc.backbone, route)
        assert not any("bn_list" in k for k in state)
        plain = apply_cifar_stem(timm.create_model("resnet18", num_classes=0, **TIMM_KWARGS))
        plain.load_state_dict(state, strict=True)
        idx = 1 if route == "pgd" else 0
        torch.testing.assert_close(plain.bn1.running_mean, enc.backbone.bn1.bn_list[idx].running_mean)
        plain.eval()
        enc.eval()
        x = images(seed=4)
        with torch.no_grad():
            expected = enc.features(x, route)
            got = plain((x - enc.mean) / enc.std)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        other = plain((x - enc.mean) / enc.std)
        assert not torch.allclose(other, enc.features(x, "pgd"), atol=1e-3)


def test_single_bn_state_of_plain_module_is_its_state_dict():
    model = backbone_plugin().build()
    state = single_bn_state(model, "pgd")
    assert state.keys() == model.state_dict().keys()


def test_non_resnet_with_cifar_stem_raises_user_error():
    with pytest.raises(UserError, match="cifar_stem"):
        TimmBackbone(validate(TimmOptions, {"model": "mobilenetv3_small_050"}, "backbone")).build()
    with pytest.raises(UserError):
        apply_cifar_stem(nn.Sequential(nn.Conv2d(3, 8, 3)))
    # and it builds when the stem option is off
    model = TimmBackbone(validate(TimmOptions, {"model": "mobilenetv3_small_050", "cifar_stem": False},
                                  "backbone")).build()
    assert model.num_features > 0


def test_unknown_timm_model_suggests_closest():
    plugin = TimmBackbone(validate(TimmOptions, {"model": "resnet181"}, "backbone"))
    with pytest.raises(UserError, match=r"did you mean 'resnet18'"):
        TimmBackbone.check_options(plugin.options)
    with pytest.raises(UserError, match="unknown timm model"):
        plugin.build()
    TimmBackbone.check_options(backbone_plugin().options)  # a valid name passes


def test_missing_weights_file_raises(tmp_path):
    with pytest.raises(UserError, match="not found"):
        TimmBackbone.check_options(backbone_plugin(weights=str(tmp_path / "nope.safetensors")).options)


def test_model_kwargs_lists_become_tuples():
    model = backbone_plugin().build()
    assert model.num_features == 64
    assert model.layer1[0].conv1.out_channels == 8 and model.layer4[0].conv1.out_channels == 64


# -- initialisation: the reference ResNets start every BN weight at 1 (no zero-init of the residual branch) ----------
def last_block_bns(model: nn.Module) -> list[nn.Module]:
    """The BN closing each residual branch: bn2 of a BasicBlock, bn3 of a Bottleneck."""
    from timm.models.resnet import BasicBlock, Bottleneck
    out = [m.bn2 for m in model.modules() if isinstance(m, BasicBlock)]
    out += [m.bn3 for m in model.modules() if isinstance(m, Bottleneck)]
    return out


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_resnet_blocks_start_with_unit_bn_weights_like_the_reference(model):
    net = backbone_plugin(model=model).build()
    bns = last_block_bns(net)
    assert len(bns) == (8 if model == "resnet18" else 16)
    for bn in bns:
        assert torch.equal(bn.weight.detach(), torch.ones_like(bn.weight)) and not bn.bias.detach().any()
    # timm's own default, still available
    zeroed = last_block_bns(backbone_plugin(model=model, zero_init_last=True).build())
    assert all(not bn.weight.detach().any() for bn in zeroed)


def test_encoder_dual_bn_routes_both_start_at_one():
    enc = encoder(dual=True)
    for bn in last_block_bns(enc.backbone):
        assert isinstance(bn, DualBatchNorm)
        for route in bn.bn_list:
            assert torch.equal(route.weight.detach(), torch.ones_like(route.weight))


def test_zero_init_last_is_ignored_by_models_without_it_and_refused_in_model_kwargs():
    plugin = TimmBackbone(validate(TimmOptions, {"model": "mobilenetv3_small_050", "cifar_stem": False}, "backbone"))
    assert plugin.build().num_features > 0
    with pytest.raises(UserError, match="backbone.zero_init_last"):
        TimmBackbone.check_options(backbone_plugin(model_kwargs={**KWARGS, "zero_init_last": False}).options)


def test_cifar_stem_init_kaiming_or_pytorch_default():
    torch.manual_seed(0)
    w = TimmBackbone(validate(TimmOptions, {"model": "resnet18"}, "backbone")).build().conv1.weight.detach()
    assert w.shape == (64, 3, 3, 3)
    # Kaiming-normal, fan-out = 64·3·3: std √(2/576)
    assert float(w.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(w.std()) == pytest.approx((2 / 576) ** 0.5, rel=0.1)
    torch.manual_seed(0)
    w = TimmBackbone(validate(TimmOptions, {"model": "resnet18", "stem_init": "pytorch"}, "backbone")).build()
    w = w.conv1.weight.detach()
    # nn.Conv2d's default: uniform on ±1/√fan_in, fan-in = 3·3·3, so std = bound/√3
    bound = 1 / 27 ** 0.5
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
    assert float(w.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.1)
