"""Losses shared by several methods, each testable alone against its formula."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def fp32(t: Tensor) -> torch.autocast:
    """Disable autocast (bf16) for a loss computation on ``t``'s device: losses stay in fp32."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def nt_xent(z: Tensor, temperature: float = 0.5, n_views: int = 2, reduction: str = "mean") -> Tensor:
    """NT-Xent (SimCLR) over interleaved views: rows k·n … k·n+n−1 are the views of image k.

    For each anchor a, ℓ_a = −log( Σ_{p ∈ pos(a)} … ) is computed per positive as in SimCLR:
    ℓ_{a,p} = −log( exp(s_ap/τ) / Σ_{b≠a} exp(s_ab/τ) ), with s = cosine similarity; the loss is the
    mean over all (anchor, positive) pairs. With n_views = 2 this is the SimCLR loss (and ACL's).
    ``reduction="per_image"`` returns each image's share instead (the mean of its anchors' terms, [N]), whose
    mean is the loss. Computed in fp32 whatever the autocast dtype.
    """
    with fp32(z):
        z = F.normalize(z.float(), dim=1)
        logits = z @ z.t() / temperature
    m = z.shape[0]
    eye = torch.eye(m, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    group = torch.arange(m, device=z.device) // n_views
    pos = (group[:, None] == group[None, :]) & ~eye
    terms = -log_prob[pos]  # row-major: image k's n·(n−1) terms are contiguous
    return terms.view(m // n_views, -1).mean(1) if reduction == "per_image" else terms.mean()


def pair_rows(a: Tensor, b: Tensor) -> Tensor:
    """Interleave two [N, …] tensors into [2N, …] with a[k] at row 2k and b[k] at row 2k+1."""
    return torch.stack((a, b), dim=1).flatten(0, 1)
