"""AdvCL (Fan, Liu, Chen, Zhang, Gan, "When Does Contrastive Learning Preserve Adversarial Robustness from
Pretraining to Finetuning?", NeurIPS 2021).

Four views per image: two augmented views x₁, x₂, the original crop x (random crop, 4 px padding, flip) made
adversarial as x̃, and the high-frequency component of x (2-D FFT with a centred disc of radius r = 8 zeroed, inverse
FFT). Pseudo labels come from clustering: k-means (scikit-learn) on the features of a pretrained standard SSL model
(``method.teacher``, a finished run directory) at several granularities (2, 10, 50, 100, 500 clusters), one linear
head per granularity. The loss is SupCon in its unsupervised form (NT-Xent with four positives per image) over
{x̃_cl, x₁, x₂, x_HFC} plus 0.2 × the mean cross-entropy of the heads on x̃_ce; the attack (PGD-5, α 2/255, ε 8/255,
eval mode) maximises that same total over both adversarial copies x̃_cl and x̃_ce of x jointly.

Differences from the reference: adversarial images share the ``pgd`` BN route of a dual-BN encoder (the reference has
a third BN for x̃_ce); the pseudo labels are computed here from the chosen teacher run, not shipped (the reference's
come from an ImageNet-pretrained SimCLR); the pseudo label of an image is its nearest centroid in the teacher's
feature space (the k-means assignment), recomputed per step from the un-augmented image.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsslctl import hookimpl, crop_flip, err_console, eval_mode, fp32, FrozenTeacher, Method, multi_view, nt_xent, opt, UserError
from rsslctl_plugins.methods.deacl import ADVCL_FAMILY_ROW


def high_frequency(x: Tensor, radius: float) -> Tensor:
    """The high-frequency component of images ``x``: centred 2-D spectrum with the disc of ``radius`` (in frequency
    bins) around zero frequency removed, transformed back (real part, not clipped)."""
    with fp32(x):
        h, w = x.shape[-2:]
        yy = torch.arange(h, device=x.device).view(h, 1) - h // 2
        xx = torch.arange(w, device=x.device).view(1, w) - w // 2
        keep = ((yy ** 2 + xx ** 2) > radius ** 2).to(torch.float32)
        spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1)) * keep
        return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real


def advcl_loss(z: Tensor, logits: list[Tensor], pseudo: list[Tensor], temperature: float, ce_weight: float) -> Tensor:
    """L = SupCon(z) + w·(1/K)·Σ_k CE(logits_k, y_k) (Fan et al., NeurIPS 2021): ``z`` holds four interleaved
    embeddings per image (all positives of each other, unsupervised SupCon = NT-Xent with 4 views), ``logits``/``pseudo``
    the K heads' logits and cluster labels."""
    with fp32(z):
        ce = torch.stack([F.cross_entropy(lg.float(), y) for lg, y in zip(logits, pseudo)]).mean()
    return nt_xent(z, temperature, n_views=4) + ce_weight * ce


def nearest_centroid(features: Tensor, centroids: Tensor) -> Tensor:
    """Index of each row's nearest centroid (squared Euclidean), computed on the device."""
    f = features.float()
    d = (f * f).sum(1, keepdim=True) - 2 * f @ centroids.t() + (centroids * centroids).sum(1)
    return d.argmin(1)


@dataclasses.dataclass
class AdvCLOptions:
    teacher: str = opt("", "run directory of a finished standard SSL run whose features are clustered")
    clusters: tuple[int, ...] = opt((2, 10, 50, 100, 500), "k of each pseudo-label granularity (one head each); "
                                    "capped at the number of training images")
    ce_weight: float = opt(0.2, "weight of the mean pseudo-label cross-entropy", min=0)
    temperature: float = opt(0.5, "SupCon / NT-Xent temperature τ", min=1e-3)
    radius: float = opt(8.0, "radius of the low-frequency disc removed for the high-frequency view", min=0)
    padding: int = opt(4, "random-crop padding of the original view", min=0)
    kmeans_seed: int = opt(0, "random_state of k-means", min=0)


class AdvCL(Method):
    """AdvCL: adversarial SupCon over augmented, adversarial and high-frequency views + cluster pseudo labels."""

    name = "advcl"
    citation = ("@inproceedings{fan2021advcl, title={When Does Contrastive Learning Preserve Adversarial Robustness "
                "from Pretraining to Finetuning?}, author={Fan, Lijie and Liu, Sijia and Chen, Pin-Yu and Zhang, "
                "Gaoyuan and Gan, Chuang}, booktitle={NeurIPS}, year={2021}}")
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
        """The AdvCL loss with x_adv = [x̃_cl; x̃_ce] and ``fixed`` = the embeddings of x₁, x₂, x_HFC stacked [N, 3, d]."""
        enc = self.encoder
        f = enc.features(x_adv, "pgd")
        f_cl, f_ce = f.chunk(2)
        z = torch.cat((enc.head(f_cl).unsqueeze(1), fixed), dim=1).flatten(0, 1)
        return advcl_loss(z, [head(f_ce) for head in self.heads], pseudo, self.options.temperature,
                          self.options.ce_weight)

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o, enc = self.options, self.encoder
        pseudo = self.pseudo_labels(images)
        views = multi_view(images, self.augment, 2)
        x_org = crop_flip(images, o.padding, None)
        x_hfc = high_frequency(x_org, o.radius)
        n = len(images)
        clean = torch.cat((views[0::2], views[1::2], x_hfc))
        with eval_mode(self):
            fixed = enc(clean, "normal").detach().view(3, n, -1).transpose(0, 1)
            start = torch.cat((x_org, x_org))
            adv = self.attack.perturb(start, lambda xa: self.losses(xa, fixed, pseudo))
        fixed = enc(clean, "normal").view(3, n, -1).transpose(0, 1)
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
