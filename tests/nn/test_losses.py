"""NT-Xent against naive re-implementations of both reference forms, plus pair_rows."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rsslctl.nn.losses import nt_xent, pair_rows


def embeddings(n_images: int = 6, n_views: int = 2, dim: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_images * n_views, dim, generator=g)


def acl_form(z: torch.Tensor, tau: float) -> float:
    """ACL/DynACL form on interleaved [2N, d], written with explicit Python loops (float64)."""
    z = z.double()
    m = z.shape[0]
    s = [[0.0] * m for _ in range(m)]
    for a in range(m):
        for b in range(m):
            num = float(z[a] @ z[b])
            den = max(float(z[a].norm()) * float(z[b].norm()), 1e-8)
            s[a][b] = num / den
    e = [[math.exp(s[a][b] / tau) for b in range(m)] for a in range(m)]
    total = 0.0
    for a in range(m):
        p = a + 1 if a % 2 == 0 else a - 1
        col = sum(e[b][a] for b in range(m)) - math.exp(1.0 / tau)
        total += -math.log(e[p][a] / col)
    return total / m


def air_form(zi: torch.Tensor, zj: torch.Tensor, tau: float) -> torch.Tensor:
    """AIR form: four N×N blocks, positive in column 0, negatives = off-diagonals of [ii|ij] / [ji|jj]."""
    zi, zj = F.normalize(zi.double(), dim=1), F.normalize(zj.double(), dim=1)
    n = zi.shape[0]
    ii, ij, ji, jj = zi @ zi.t() / tau, zi @ zj.t() / tau, zj @ zi.t() / tau, zj @ zj.t() / tau
    off = ~torch.eye(n, dtype=torch.bool)
    rows = []
    for k in range(n):
        neg_i = torch.cat([ii[k][off[k]], ij[k][off[k]]])
        rows.append(torch.cat([ij[k, k : k + 1], neg_i]))
    for k in range(n):
        neg_j = torch.cat([ji[k][off[k]], jj[k][off[k]]])
        rows.append(torch.cat([ji[k, k : k + 1], neg_j]))
    logits = torch.stack(rows)
    assert logits.shape == (2 * n, 2 * n - 1)
    return F.cross_entropy(logits, torch.zeros(2 * n, dtype=torch.long))


def multiview_loop(z: torch.Tensor, tau: float, n_views: int) -> float:
    """Mean over (anchor, positive) pairs of −log(exp(s_ap/τ) / Σ_{b≠a} exp(s_ab/τ))."""
    z = F.normalize(z.double(), dim=1)
    m = z.shape[0]
    terms = []
    for a in range(m):
        den = sum(math.exp(float(z[a] @ z[b]) / tau) for b in range(m) if b != a)
        for p in range(m):
            if p != a and p // n_views == a // n_views:
                terms.append(-math.log(math.exp(float(z[a] @ z[p]) / tau) / den))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("tau", [0.5, 0.1, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_acl_form(tau, seed):
    z = embeddings(seed=seed)
    assert nt_xent(z, tau).item() == pytest.approx(acl_form(z, tau), abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("tau", [0.5, 0.2])
def test_matches_air_form(tau):
    z = embeddings(n_images=7, dim=9, seed=3)
    ref = air_form(z[0::2], z[1::2], tau)
    assert nt_xent(z, tau).item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    # and both reference forms agree with each other
    assert ref.item() == pytest.approx(acl_form(z, tau), abs=1e-9)


def test_default_temperature_is_half():
    z = embeddings(seed=4)
    assert nt_xent(z).item() == pytest.approx(acl_form(z, 0.5), abs=1e-5)


@pytest.mark.parametrize("n_views", [3, 4])
def test_multi_view_matches_naive_loop(n_views):
    z = embeddings(n_images=4, n_views=n_views, dim=6, seed=5)
    tau = 0.3
    assert nt_xent(z, tau, n_views=n_views).item() == pytest.approx(multiview_loop(z, tau, n_views), abs=1e-5)
    # n_views matters: grouping rows in pairs gives a different value
    assert abs(nt_xent(z, tau, n_views=n_views).item() - nt_xent(z, tau, n_views=2).item()) > 1e-3


def test_two_views_loop_equals_acl_form():
    z = embeddings(seed=6)
    assert multiview_loop(z, 0.5, 2) == pytest.approx(acl_form(z, 0.5), abs=1e-9)


def test_scale_invariant_and_depends_on_pairing():
    z = embeddings(seed=7)
    scale = torch.rand(z.shape[0], 1) * 10 + 0.1
    torch.testing.assert_close(nt_xent(z * scale), nt_xent(z), atol=1e-5, rtol=0)
    # permuting whole images (keeping pairs together) leaves the loss unchanged
    perm = torch.tensor([2, 0, 5, 1, 4, 3])
    zp = z.view(6, 2, -1)[perm].flatten(0, 1)
    torch.testing.assert_close(nt_xent(zp), nt_xent(z), atol=1e-5, rtol=0)
    # breaking the pairs changes it
    rows = torch.tensor([0, 2, 1, 3] + list(range(4, 12)))
    assert abs(nt_xent(z[rows]).item() - nt_xent(z).item()) > 1e-3


def test_aligned_pairs_give_lower_loss():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(8, 16, generator=g)
    aligned = pair_rows(base, base + 0.01 * torch.randn(8, 16, generator=g))
    unaligned = torch.randn(16, 16, generator=g)
    assert nt_xent(aligned).item() < nt_xent(unaligned).item() - 0.5


def test_gradient_flows_to_inputs():
    z = embeddings(seed=9).requires_grad_(True)
    nt_xent(z).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_pair_rows_interleaves():
    a = torch.arange(4 * 3).view(4, 3)
    b = -torch.arange(4 * 3).view(4, 3) - 100
    out = pair_rows(a, b)
    assert out.shape == (8, 3)
    for k in range(4):
        assert torch.equal(out[2 * k], a[k])
        assert torch.equal(out[2 * k + 1], b[k])
    imgs_a, imgs_b = torch.rand(3, 3, 4, 4), torch.rand(3, 3, 4, 4)
    out = pair_rows(imgs_a, imgs_b)
    assert out.shape == (6, 3, 4, 4)
    assert torch.equal(out[0::2], imgs_a) and torch.equal(out[1::2], imgs_b)


def test_pair_rows_then_nt_xent_equals_air_form():
    g = torch.Generator().manual_seed(10)
    zi, zj = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert nt_xent(pair_rows(zi, zj), 0.5).item() == pytest.approx(air_form(zi, zj, 0.5).item(), abs=1e-5)


def test_bf16_inputs_give_fp32_result():
    z = embeddings(seed=11).bfloat16()
    out = nt_xent(z)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(acl_form(z.float(), 0.5), abs=1e-5)


def test_fp32_result_under_bf16_autocast():
    """The engine runs training steps under bf16 autocast; the loss itself must stay fp32 and accurate."""
    z = embeddings(n_images=16, dim=32, seed=12)
    ref = acl_form(z, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nt_xent(z)
        out_bf16_in = nt_xent(z.bfloat16())
    assert out.dtype == torch.float32 and out_bf16_in.dtype == torch.float32
    assert out.item() == pytest.approx(ref, abs=1e-5)
    assert out_bf16_in.item() == pytest.approx(acl_form(z.bfloat16().float(), 0.5), abs=1e-5)
