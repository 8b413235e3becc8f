"""MoCHi has no public code (its authors released trained models only); rsslctl follows the paper (Kalantidis et al.,
NeurIPS 2020, Sec. 4) on MoCo v2. Each synthetic negative must be one of the paper's two kinds, checked here by
decomposing it, independently of how the implementation draws its random numbers:
h = normalize(α·n_i + (1 − α)·n_j), α ∈ [0, 1], n_i, n_j among the N queue entries closest to q, and
h′ = normalize(β·q + (1 − β)·n_j), β ∈ [0, β_max]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rsslctl_plugins.methods.mochi import mochi_negatives


def _mix_coefficients(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(c_a, c_b, residual) of the least-squares fit h ≈ c_a·a + c_b·b."""
    basis = torch.stack([a, b], 1).double()
    c = torch.linalg.lstsq(basis, h.double()[:, None]).solution[:, 0]
    return float(c[0]), float(c[1]), float((basis @ c - h.double()).norm())


def test_mochi_negatives_are_the_papers_two_kinds_of_mix() -> None:
    torch.manual_seed(0)
    dim, k, n_hard, s1, s2, beta_max = 12, 30, 5, 6, 4, 0.5
    q = F.normalize(torch.randn(3, dim), dim=1)
    queue = F.normalize(torch.randn(k, dim), dim=1)
    synth = mochi_negatives(q, queue, n_hard, s1, s2, beta_max)
    assert synth.shape == (3, s1 + s2, dim)
    assert torch.allclose(synth.norm(dim=2), torch.ones(3, s1 + s2), atol=1e-5)
    for b in range(3):
        hard = queue[(queue @ q[b]).argsort(descending=True)[:n_hard]]  # the N hardest, by hand
        for h in synth[b, :s1]:  # a mix of two hard negatives with non-negative weights
            fits = [_mix_coefficients(h, hard[i], hard[j]) for i in range(n_hard) for j in range(n_hard)]
            fits = [(ca, cb) for ca, cb, r in fits if r < 1e-4]
            assert fits and any(ca >= -1e-5 and cb >= -1e-5 for ca, cb in fits), "not a mix of two hard negatives"
        for h in synth[b, s1:]:  # a mix of the query and one hard negative, β = c_q / (c_q + c_n) ≤ β_max
            ok = False
            for j in range(n_hard):
                cq, cn, r = _mix_coefficients(h, q[b], hard[j])
                if r < 1e-4 and cq >= -1e-6 and cn > 0:
                    ok = ok or cq / (cq + cn) <= beta_max + 1e-5
            assert ok, "not a mix of the query with a hard negative at β ≤ β_max"
