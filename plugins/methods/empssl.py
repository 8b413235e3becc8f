"""EMP-SSL (Tong et al., 2023) and its adversarial / free-adversarial variants (CF-AMC-SSL).

n views per image (patch-based: RandomResizedCrop scale (0.25, 0.25), ratio 1; crop-based: scale (0.08, 1),
ratio (3/4, 4/3) — set in the recipe's [augment] table), plus Gaussian blur and solarisation here.
Encoder features → pre-feature Linear(D→4096)+BN+ReLU (the representation) → projector
Linear(4096→4096)+BN+ReLU+Linear(4096→1024) → L2-normalised z. The recipe sets ``encoder.head_layers = 0``:
this method owns its heads. Loss over patches p with z̄ the mean over patches:
``L = −tcr_weight·(1/n)Σ_p R(Z_p) − inv_weight·(1/n)Σ_p mean_b cos(Z_p[b], z̄[b])``,
``R(Z) = ½ logdet(I + d/(m·ε)·ZᵀZ)``.

Evaluation is bag-of-features: ``eval_features`` averages the 4096-d pre-features of ``eval_views``
augmented views of each image (0 = the whole image once).
"""
from __future__ import annotations

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsslctl import AdversarialTraining, Encoder, HostRandom, Method, fp32, hookimpl
from rsslctl_plugins.methods.options import CITATION, EMPAdvOptions, EMPOptions


def coding_rate(z: Tensor, eps: float = 0.2) -> Tensor:
    """R(Z) = ½ logdet(I_d + d/(m·ε)·ZᵀZ) for Z [m, d] (or batched [p, m, d]); ε used directly as in EMP-SSL.

    Computed as ½ logdet(I_m + d/(m·ε)·Z Zᵀ) when m < d (same value, Sylvester's determinant identity).
    """
    with fp32(z):
        z = z.float()
        m, d = z.shape[-2:]
        gram = z @ z.transpose(-1, -2) if m < d else z.transpose(-1, -2) @ z
        eye = torch.eye(gram.shape[-1], device=z.device)
        return 0.5 * torch.logdet(eye + (d / (m * eps)) * gram)


def emp_loss(z: Tensor, n_views: int, eps: float = 0.2, inv_weight: float = 200.0,
             tcr_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, mean R, mean cosine to the patch average) for patch-major L2-normalised z [n·N, d]."""
    with fp32(z):
        zp = z.float().view(n_views, -1, z.shape[-1])
        tcr = coding_rate(zp, eps).mean()
        inv = F.cosine_similarity(zp, zp.mean(0, keepdim=True), dim=-1).mean()
        return -tcr_weight * tcr - inv_weight * inv, tcr, inv


class EMPSSL(Method):
    """EMP-SSL: many views per image, total coding rate + invariance to the mean view."""

    name = "empssl"
    citation = CITATION["empssl"]
    Options = EMPOptions

    def __init__(self, options: EMPOptions, encoder: Encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        o, d = options, encoder.out_dim
        self.pre_feature = nn.Sequential(nn.Linear(d, o.pre_dim), nn.BatchNorm1d(o.pre_dim), nn.ReLU(inplace=True))
        self.projector = nn.Sequential(nn.Linear(o.pre_dim, o.hidden_dim), nn.BatchNorm1d(o.hidden_dim),
                                       nn.ReLU(inplace=True), nn.Linear(o.hidden_dim, o.z_dim))
        self.extra = HostRandom(K.RandomGaussianBlur((5, 5), (0.1, 2.0), p=o.blur_p),
                                   K.RandomSolarize(0.0, 0.0, p=o.solarize_p))

    def views(self, images: Tensor, n: int) -> Tensor:
        """n views per image, patch-major: rows [p·N, (p+1)·N) are view p of every image."""
        return self.extra(self.augment(images.repeat(n, 1, 1, 1))).clamp_(0.0, 1.0)

    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.projector(self.pre_feature(self.encoder(x))), dim=1)

    def loss(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o = self.options
        loss, tcr, inv = emp_loss(z, o.n_views, o.tcr_eps, o.inv_weight, o.tcr_weight)
        return loss, {"tcr": tcr.detach(), "invariance": inv.detach()}

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss(self.embed(self.views(images, self.options.n_views)))

    def eval_features(self, x: Tensor, route: str) -> Tensor:
        n = self.options.eval_views
        # through the encoder's head too (usually none), exactly as in training
        if n == 0:
            return self.pre_feature(self.encoder(x, route))
        feats = self.pre_feature(self.encoder(self.views(x, n), route))
        return feats.view(n, x.shape[0], -1).mean(0)


class EMPSSLAdv(AdversarialTraining, EMPSSL):
    """Robust EMP-SSL: the EMP loss on adversarial views only, PGD-AT or free AT (free + crops = CF-AMC-SSL).

    The attack maximises the total EMP loss over all n views jointly, with the model in train mode (as the
    reference: BN statistics also see the attack's forwards)."""

    name = "empssl_adv"
    citation = CITATION["empssl_adv"]
    Options = EMPAdvOptions
    needs_attack = True

    def __init__(self, options: EMPAdvOptions, encoder: Encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        self.setup_adversarial()

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        views = self.replayed(lambda: self.views(images, self.options.n_views))
        adv, extra = self.adversarial(views, lambda xa: self.loss(self.embed(xa))[0])
        loss, metrics = self.loss(self.embed(adv))
        return (loss if extra is None else loss + extra), metrics


@hookimpl
def rsslctl_methods() -> list[type]:
    return [EMPSSL, EMPSSLAdv]
