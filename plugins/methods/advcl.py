"""AdvCL (Fan, Liu, Chen, Zhang, Gan, "When Does Contrastive Learning Preserve Adversarial Robustness from
Pretraining to Finetuning?", NeurIPS 2021).

Four views per image: two augmented views x₁, x₂, the original crop x (random crop, 4 px padding, flip) made
adversarial as x̃, and the high-frequency component of x (2-D FFT with the centred disc of distance < r = 8 zeroed,
inverse FFT). Pseudo labels come from clustering: k-means (scikit-learn) on the features of a pretrained standard SSL
model (``method.teacher``, a finished run directory) at several granularities (2, 10, 50, 100, 500 clusters), one
linear head per granularity. The loss is SupCon in its unsupervised form (NT-Xent with four positives per image,
scaled by τ / base_temperature = 0.5 / 0.07) over {x̃_cl, x₁, x₂, x_HFC} plus 0.2 × the mean cross-entropy of the
heads on x̃_ce; the attack (PGD-5, α 2/255, ε 8/255, train mode) maximises that same total over both adversarial
copies x̃_cl and x̃_ce of x jointly.

Equal by default to the authors' code (github.com/LijieFan/AdvCL, ``pretraining_advCL.py``, ``losses.py``
``SupConLoss``, ``fr_util.py`` ``generate_high``; commit 24cb7a6): the SupCon scale τ / base_temperature (their
``SupConLoss`` keeps its default base 0.07 while τ = 0.5, so the contrastive term is 7.14 × NT-Xent and the pseudo-label
CE weighs 0.2 / 7.14 of it; ``base_temperature = temperature`` gives the plain sum); the attack with the network in
train mode (BN batch statistics; ``attack_bn = "eval"`` attacks with running statistics instead); every view in a
forward of its own (BN statistics per view); the filter removes the bins at distance < r and keeps those at exactly
r. The reference's random start is not clipped to [0, 1]: ``recipes/advcl.toml`` sets ``[attack] clamp_start = false``.

Remaining differences: adversarial images share the ``pgd`` BN route of a dual-BN encoder (the reference has a third
BN for x̃_ce, and one BN in the projection head for all routes); the pseudo labels are computed here from the chosen
teacher run, not shipped (the reference's come from an ImageNet-pretrained SimCLR); the pseudo label of an image is
its nearest centroid in the teacher's feature space (the k-means assignment), recomputed per step from the
un-augmented image; the fixed views' embeddings are computed once per step (the reference recomputes them, with the
same values, at every attack step, which moves the BN running statistics five more times); the reference's attack sums
its cross-entropy over the batch (with separate forwards of x̃_cl and x̃_ce and sign steps the steps are the same);
the filter's centre is (h // 2, w // 2) (the reference takes h / 2 for both axes: the same on its even, square
images, half a bin off on odd or non-square ones).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsslctl import (
    FrozenTeacher,
    Method,
    UserError,
    crop_flip,
    err_console,
    eval_mode,
    fp32,
    hookimpl,
    multi_view,
    nt_xent,
)
from rsslctl_plugins.methods.deacl import ADVCL_FAMILY_ROW
from rsslctl_plugins.methods.options import CITATION, AdvCLOptions


def high_frequency(x: Tensor, radius: float) -> Tensor:
    """The high-frequency component of images ``x``: centred 2-D spectrum with the bins at distance < ``radius`` (in
    frequency bins) from zero frequency removed, those at exactly ``radius`` kept (as the reference's
    ``generate_high``), transformed back (real part, not clipped)."""
    with fp32(x):
        h, w = x.shape[-2:]
        yy = torch.arange(h, device=x.device).view(h, 1) - h // 2
        xx = torch.arange(w, device=x.device).view(1, w) - w // 2
        keep = ((yy ** 2 + xx ** 2) >= radius ** 2).to(torch.float32)
        spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1)) * keep
        return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real


def advcl_loss(z: Tensor, logits: list[Tensor], pseudo: list[Tensor], temperature: float, ce_weight: float,
               base_temperature: float = 0.07) -> Tensor:
    """L = (τ/τ_base)·SupCon(z) + w·(1/K)·Σ_k CE(logits_k, y_k) (Fan et al., NeurIPS 2021): ``z`` holds four
    interleaved embeddings per image (all positives of each other, unsupervised SupCon = NT-Xent with 4 views, scaled
    by τ / ``base_temperature`` as SupCon's reference loss), ``logits``/``pseudo`` the K heads' logits and cluster
    labels."""
    with fp32(z):
        ce = torch.stack([F.cross_entropy(lg.float(), y) for lg, y in zip(logits, pseudo)]).mean()
    return (temperature / base_temperature) * nt_xent(z, temperature, n_views=4) + ce_weight * ce


def nearest_centroid(features: Tensor, centroids: Tensor) -> Tensor:
    """Index of each row's nearest centroid (squared Euclidean), computed on the device."""
    f = features.float()
    d = (f * f).sum(1, keepdim=True) - 2 * f @ centroids.t() + (centroids * centroids).sum(1)
    return d.argmin(1)


class AdvCL(Method):
    """AdvCL: adversarial SupCon over augmented, adversarial and high-frequency views + cluster pseudo labels."""

    name = "advcl"
    citation = CITATION["advcl"]
    Options = AdvCLOptions
    needs_attack = True
    wants_dual_bn = True
    finetune_rows = {"AdvCL": ADVCL_FAMILY_ROW}

    def __init__(self, options: AdvCLOptions, encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        self.teacher = FrozenTeacher(options.teacher, "method.teacher")
        self.heads = nn.ModuleList(nn.Linear(encoder.num_features, k) for k in options.clusters)
        self.centroids: list[Tensor] = []

    @classmethod
    def check_options(cls, options: AdvCLOptions, where: str) -> None:
        if not options.clusters or min(options.clusters) < 2:
            raise UserError(f"{where}.clusters = {list(options.clusters)}: give one or more cluster counts >= 2")

    def prepare(self, images: Tensor, total_steps: int) -> None:
        """Load the teacher and fit k-means on its features of the (un-augmented) training images. On the ``meta``
        device (the host-sync test) the fit runs on the CPU, since meta tensors hold no values."""
        device = next(self.encoder.parameters()).device
        work = torch.device("cpu") if device.type == "meta" else device
        teacher = self.teacher.load(work)
        self.teacher.check_compatible(self.encoder, images[:1].float().div(255).to(work), same_width=False)
        feats = torch.cat([self.teacher.features(images[i:i + 512].to(work).float().div(255)).float().cpu()
                           for i in range(0, len(images), 512)])  # slices: a streamed split decodes each on demand
        self.centroids = [c.to(device) for c in self.fit_centroids(feats)]
        teacher.to(device)

    def fit_centroids(self, feats: Tensor) -> list[Tensor]:
        from sklearn.cluster import KMeans
        out = []
        for k in self.options.clusters:
            n = min(k, len(feats))
            if n < k:
                err_console.print(f"method.clusters: {k} clusters capped at the {len(feats)} training images")
            km = KMeans(n_clusters=n, n_init=3, random_state=self.options.kmeans_seed).fit(feats.double().numpy())
            out.append(torch.from_numpy(km.cluster_centers_).float())
        return out

    def pseudo_labels(self, images: Tensor) -> list[Tensor]:
        feats = self.teacher.features(images.float().div(255) if images.dtype == torch.uint8 else images)
        return [nearest_centroid(feats, c) for c in self.centroids]

    def losses(self, x_adv: Tensor, fixed: Tensor, pseudo: list[Tensor]) -> Tensor:
        """The AdvCL loss with x_adv = [x̃_cl; x̃_ce] and ``fixed`` = the embeddings of x₁, x₂, x_HFC stacked [N, 3, d].
        x̃_cl and x̃_ce are forwarded separately (each its own BN batch, as the reference's two routes)."""
        o, enc = self.options, self.encoder
        x_cl, x_ce = x_adv.chunk(2)
        z = torch.cat((enc(x_cl, "pgd").unsqueeze(1), fixed), dim=1).flatten(0, 1)
        f_ce = enc.features(x_ce, "pgd")
        return advcl_loss(z, [head(f_ce) for head in self.heads], pseudo, o.temperature, o.ce_weight,
                          o.base_temperature)

    def embed_views(self, views: tuple[Tensor, ...]) -> Tensor:
        """[N, 3, d]: each clean view through the normal BN in a forward of its own (BN statistics per view)."""
        return torch.stack([self.encoder(v, "normal") for v in views], dim=1)

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o = self.options
        pseudo = self.pseudo_labels(images)
        views = multi_view(images, self.augment, 2)
        x_org = crop_flip(images, o.padding, None)
        clean = (views[0::2], views[1::2], high_frequency(x_org, o.radius))
        fixed = self.embed_views(clean)
        train = o.attack_bn == "train"
        with contextlib.nullcontext() if train else eval_mode(self):
            target = fixed.detach() if train else self.embed_views(clean).detach()  # train: the same values
            adv = self.attack.perturb(torch.cat((x_org, x_org)), lambda xa: self.losses(xa, target, pseudo))
        loss = self.losses(adv, fixed, pseudo)
        return loss, {"loss_adv": loss.detach()}

    def run_state(self) -> dict[str, Tensor]:
        return {**self.teacher.state(), **{f"centroids.{i}": c for i, c in enumerate(self.centroids)}}

    def load_run_state(self, state: dict[str, Tensor]) -> None:
        self.teacher.load_state(state)
        saved = [state[f"centroids.{i}"] for i in range(len(self.options.clusters)) if f"centroids.{i}" in state]
        if saved:
            self.centroids = saved


@hookimpl
def rsslctl_methods() -> list[type]:
    return [AdvCL]
