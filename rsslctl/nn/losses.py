"""Losses shared by several methods, each testable alone against its formula."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from rsslctl.runtime.distributed import gather_with_grad, rank


def fp32(t: Tensor) -> contextlib.AbstractContextManager:
    """Disable autocast (bf16) for a loss computation on ``t``'s device: losses stay in fp32. Devices without
    autocast (``meta``, used by the host-sync test) have nothing to disable."""
    if not torch.amp.is_autocast_available(t.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=t.device.type, enabled=False)


def nt_xent(z: Tensor, temperature: float = 0.5, n_views: int = 2, reduction: str = "mean",
            one_sided: bool = False) -> Tensor:
    """NT-Xent (SimCLR) over interleaved views: rows k·n … k·n+n−1 are the views of image k.

    For each anchor a, ℓ_a = −log( Σ_{p ∈ pos(a)} … ) is computed per positive as in SimCLR:
    ℓ_{a,p} = −log( exp(s_ap/τ) / Σ_{b≠a} exp(s_ab/τ) ), with s = cosine similarity; the loss is the
    mean over all (anchor, positive) pairs. With n_views = 2 this is the SimCLR loss (and ACL's).
    ``reduction="per_image"`` returns each image's share instead (the mean of its anchors' terms, [N]), whose
    mean is the loss. Computed in fp32 whatever the autocast dtype. ``one_sided`` takes s_ab = z_a·sg(z_b) (the
    columns detached, a reference quirk of RoCL): the same value, gradients through the anchors only.

    In a data-parallel step (``rsslctl.runtime.distributed``) the negatives b range over the global batch: the rows of
    every rank are gathered with gradient, this rank's rows are the anchors, and the result is this rank's share of the
    global loss (the mean over ranks is the loss above on the global batch).
    """
    sim, offset = global_similarities(z, one_sided)
    m = z.shape[0]
    logits = (sim / temperature).masked_fill(self_mask(sim, offset), float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    terms = -log_prob.gather(1, positive_columns(m, n_views, z.device) + offset)  # [m, n−1]: image k's rows k·n…
    return terms.view(m // n_views, -1).mean(1) if reduction == "per_image" else terms.mean()


def global_similarities(z: Tensor, one_sided: bool = False) -> tuple[Tensor, int]:
    """(cosine similarities [m, M] of this rank's m rows of ``z`` against all M rows of the global batch, the column
    of this rank's first row). In a data-parallel step (``rsslctl.runtime.distributed``) the rows of every rank are
    gathered with gradient, so every contrastive loss built on this sees the global batch's negatives; otherwise M = m
    and the offset is 0. In fp32 whatever the autocast dtype. ``one_sided`` detaches the columns (RoCL's reference
    quirk)."""
    with fp32(z):
        z = F.normalize(z.float(), dim=1)
        everyone = gather_with_grad(z)
        sim = z @ (everyone.detach() if one_sided else everyone).t()
    return sim, (rank() * z.shape[0] if everyone is not z else 0)


def self_mask(sim: Tensor, offset: int) -> Tensor:
    """[m, M] bool, true where a row of ``global_similarities`` meets itself (column row + offset)."""
    rows = torch.arange(sim.shape[0], device=sim.device)[:, None] + offset
    return rows == torch.arange(sim.shape[1], device=sim.device)[None, :]


def positive_columns(m: int, n_views: int, device: torch.device) -> Tensor:
    """[m, n−1] column indices of each row's positives among m interleaved rows (rows k·n … k·n+n−1 are image k's
    views): row a's own group minus a itself, ascending. Built from shapes alone, so selecting the positives is a
    gather — a boolean mask (``x[mask]``) would need ``nonzero``, a device→host sync on CUDA."""
    a = torch.arange(m, device=device)[:, None]
    j = torch.arange(n_views - 1, device=device)[None, :]
    offset = j + (j >= a % n_views).long()  # the n−1 view slots of the group that are not a's own
    return a - a % n_views + offset


def pair_rows(a: Tensor, b: Tensor) -> Tensor:
    """Interleave two [N, …] tensors into [2N, …] with a[k] at row 2k and b[k] at row 2k+1."""
    return torch.stack((a, b), dim=1).flatten(0, 1)
