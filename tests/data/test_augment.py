"""Behaviour of the view augmentation: shapes, interleaving, randomness, strength, schedule."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rsslctl.base.errors import UserError
from rsslctl.base.options import validate
from rsslctl.data.augment import AugmentOptions, ViewAugment, multi_view
from rsslctl_plugins.methods.dynacl import strength_schedule

N = 64


def images(n: int = N, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth, colourful, left/right-asymmetric uint8 images."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, channels, 8, 8, generator=g), size=(size, size), mode="bilinear")
    x[..., : size // 4] = 1.0  # bright left band: no image equals its mirror image
    return (x * 255).round().to(torch.uint8)


def identity_options(**kw) -> AugmentOptions:
    """Every random op disabled (or at negligible strength)."""
    base = dict(strength=0.01, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                grayscale_p=0.0)
    return AugmentOptions(**{**base, **kw})


def is_gray(y: torch.Tensor) -> torch.Tensor:
    return ((y[:, 0] - y[:, 1]).abs().amax((1, 2)) < 1e-5) & ((y[:, 1] - y[:, 2]).abs().amax((1, 2)) < 1e-5)


def test_shape_dtype_range():
    aug = ViewAugment(24, AugmentOptions())
    y = aug(images(size=40))
    assert y.shape == (N, 3, 24, 24) and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1


def test_uint8_and_float_inputs_equivalent():
    x = images()
    aug = ViewAugment(32, AugmentOptions())
    torch.manual_seed(1)
    a = aug(x)
    torch.manual_seed(1)
    b = aug(x.float() / 255)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_disabled_augmentation_is_identity():
    x = images()
    y = ViewAugment(32, identity_options())(x)
    torch.testing.assert_close(y, x.float() / 255, atol=1e-5, rtol=0)


def test_multi_view_interleaves_views_one_batched_call():
    x = images(n=8)
    calls = []

    def augment(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape[0])
        return ViewAugment(32, identity_options())(t)

    y = multi_view(x, augment, 3)
    assert calls == [24] and y.shape == (24, 3, 32, 32)
    for k in range(8):
        for j in range(3):
            torch.testing.assert_close(y[3 * k + j], x[k].float() / 255, atol=1e-5, rtol=0)


def test_multi_view_with_random_flip_keeps_views_of_an_image_together():
    x = images(n=16)
    y = multi_view(x, ViewAugment(32, identity_options(flip_p=0.5)), 4)
    ref = x.float() / 255
    for row in range(64):
        src = ref[row // 4]
        same = torch.allclose(y[row], src, atol=1e-5) or torch.allclose(y[row], src.flip(-1), atol=1e-5)
        assert same, f"row {row} is not a view of image {row // 4}"


def test_parameters_are_per_sample():
    x = images(n=1).expand(N, -1, -1, -1)  # N copies of one image
    y = ViewAugment(32, AugmentOptions())(x)
    distinct = {tuple(r.flatten()[::97].tolist()) for r in y}
    assert len(distinct) >= N - 2


def test_seed_and_rng_state_reproduce_the_stream():
    x = images()
    aug = ViewAugment(32, AugmentOptions())
    torch.manual_seed(7)
    a = aug(x)
    state = torch.get_rng_state()
    b = aug(x)
    torch.set_rng_state(state)
    b_again = aug(x)
    torch.manual_seed(7)
    a_again = aug(x)
    assert torch.equal(a, a_again) and torch.equal(b, b_again) and not torch.equal(a, b)


def test_strength_scales_distortion():
    x = images()
    ref = x.float() / 255
    opts = AugmentOptions(flip_p=0.0)
    torch.manual_seed(0)
    strong = (ViewAugment(32, opts)(x) - ref).abs().mean()
    aug = ViewAugment(32, opts)
    aug.set_strength(0.01)
    torch.manual_seed(0)
    weak = (aug(x) - ref).abs().mean()
    assert weak < 0.1 * strong
    # set_strength(s) behaves exactly like building with strength s
    torch.manual_seed(0)
    built = ViewAugment(32, AugmentOptions(flip_p=0.0, strength=0.01))(x)
    torch.manual_seed(0)
    assert torch.equal(aug(x), built)


def test_set_strength_rejects_out_of_range():
    aug = ViewAugment(32, AugmentOptions())
    for s in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError):
            aug.set_strength(s)


@pytest.mark.parametrize("strength,expected,tol", [(1.0, 0.2, 0.06), (0.01, 0.002, 0.01)])
def test_grayscale_probability_scales_with_strength(strength, expected, tol):
    torch.manual_seed(0)
    y = ViewAugment(32, AugmentOptions(strength=strength))(images(n=1024))
    assert abs(is_gray(y).float().mean().item() - expected) < tol


@pytest.mark.parametrize("strength", [1.0, 0.01])
def test_flip_is_half_at_any_strength(strength):
    x = images(n=1024)
    torch.manual_seed(0)
    y = ViewAugment(32, identity_options(strength=strength, flip_p=0.5))(x)
    flipped = ((y - (x.float() / 255).flip(-1)).abs().amax((1, 2, 3)) < 1e-5).float().mean().item()
    assert abs(flipped - 0.5) < 0.06


def test_jitter_probability_is_0_8_times_strength():
    x = images(n=1024)
    for s, expected in [(1.0, 0.8), (0.5, 0.4)]:
        torch.manual_seed(0)
        y = ViewAugment(32, identity_options(strength=s, jitter_p=0.8))(x)
        changed = ((y - x.float() / 255).abs().amax((1, 2, 3)) > 1e-4).float().mean().item()
        assert abs(changed - expected) < 0.06


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_crop_matches_torch_resize_away_from_the_crop_edge(interpolation):
    x = images()
    aug = ViewAugment(32, AugmentOptions(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, interpolation=interpolation))
    y = aug(x)
    boxes = aug.geometric[0]._params["src"].long()
    checked = 0
    for i in range(N):
        (x0, y0), (x1, y1) = boxes[i, 0].tolist(), boxes[i, 2].tolist()
        if x1 - x0 < 23 or y1 - y0 < 23:  # strongly upscaled crops: the edge band covers the check window
            continue
        ref = F.interpolate(x[i : i + 1, :, y0 : y1 + 1, x0 : x1 + 1].float() / 255, size=(32, 32),
                            mode=interpolation, align_corners=False).clamp(0, 1)
        torch.testing.assert_close(y[i, :, 4:-4, 4:-4], ref[0, :, 4:-4, 4:-4], atol=1e-5, rtol=0)
        checked += 1
    assert checked > 5


def test_bilinear_and_bicubic_differ():
    x = images()
    out = {}
    for interpolation in ("bicubic", "bilinear"):
        torch.manual_seed(0)
        out[interpolation] = ViewAugment(32, AugmentOptions(interpolation=interpolation))(x)
        assert out[interpolation].min() >= 0 and out[interpolation].max() <= 1
    assert not torch.equal(out["bicubic"], out["bilinear"])


def test_single_channel_input():
    y = ViewAugment(32, AugmentOptions())(images(channels=1, size=28))
    assert y.shape == (N, 1, 32, 32) and 0 <= y.min() and y.max() <= 1


def test_options_validate():
    o = validate(AugmentOptions, {"strength": "1/2", "interpolation": "bilinear", "crop_scale": [0.2, 1]}, "augment")
    assert o.strength == 0.5 and o.crop_scale == (0.2, 1.0) and o.interpolation == "bilinear"
    for bad in ({"strength": 0}, {"interpolation": "nearest"}, {"jitter": [0.4, 0.4]}, {"strenght": 1}):
        with pytest.raises(UserError):
            validate(AugmentOptions, bad, "augment")


def test_strength_schedule_dynacl():
    s = [strength_schedule(e, 1000, 50) for e in range(1, 1001)]
    assert s[0] == 1.0 and s[49] == 1.0 and s[50] == pytest.approx(0.95)
    assert all(v == pytest.approx(0.05) for v in s[950:])
    assert len(set(s)) == 20 and s == sorted(s, reverse=True)
    assert strength_schedule(2000, 1000) > 0  # past the end: clamped to a positive floor
    with pytest.raises(ValueError):
        strength_schedule(0, 1000)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = images()
    aug = ViewAugment(32, AugmentOptions())
    torch.manual_seed(0)
    cpu = aug(x)
    torch.manual_seed(0)
    gpu = aug(x.cuda())
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().mean() < 1e-3
