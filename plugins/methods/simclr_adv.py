"""Adversarial SimCLR and SimCLR-FreeAdv as in CF-AMC-SSL.

Only view 2 is attacked: the attack maximises NT-Xent between f(x2) and f(x2 + δ) (instance-wise,
RoCL-like); training pairs are (x1 clean, x2 + δ). ``training = "free"`` keeps δ across minibatches and
replays each minibatch m times (SimCLR-FreeAdv). Single BN, τ = 0.07 (SupCon in unsupervised mode).

With ``pre_dim > 0`` (the recipes: 4096) the method owns the reference network's heads, as EMP-SSL does:
backbone → pre-feature Linear(D→pre_dim)+BN+ReLU → projector Linear(pre_dim→hidden_dim)+BN+ReLU+Linear(→z_dim),
no BN at the end; evaluation uses the pre-feature of the whole image, the representation the reference's
classifiers are trained on. ``pre_dim = 0`` keeps the [encoder] head as the projector and evaluates backbone features.
"""
from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from rsslctl import hookimpl, AdversarialTraining, AdvTrainingOptions, Method, multi_view, nt_xent, opt, pair_rows, UserError


@dataclasses.dataclass
class SimCLRAdvOptions(AdvTrainingOptions):
    temperature: float = opt(0.07, "NT-Xent temperature τ (CF-AMC-SSL: 0.07)", min=1e-3)
    pre_dim: int = opt(0, "method-owned pre-feature width, the evaluated representation (CF-AMC-SSL: 4096; needs "
                          "encoder.head_layers = 0); 0 = the [encoder] head projects, backbone features are evaluated",
                       min=0)
    hidden_dim: int = opt(4096, "with pre_dim: projector hidden width (Linear+BN+ReLU)", min=1)
    z_dim: int = opt(128, "with pre_dim: embedding width (last Linear, no BN)", min=1)


class SimCLRAdv(AdversarialTraining, Method):
    """SimCLR with PGD-AT (or free AT) on the second view."""

    name = "simclr_adv"
    citation = ("@article{ghofrani2025cfamcssl, "
                "title={Rapid Learning of Adversarially Robust Representations with Cost-Free Adversarial Multi-Crop Self-Supervised Learning}, "
                "author={Ghofrani, Ali and Jamshidi, Fatemeh}, journal={arXiv:2501.03507}, year={2025}}")
    Options = SimCLRAdvOptions
    needs_attack = True

    def __init__(self, options: SimCLRAdvOptions, encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        self.setup_adversarial()
        o = options
        self.pre_feature: nn.Module | None = None
        self.projector: nn.Module | None = None
        if o.pre_dim:
            if not isinstance(encoder.head, nn.Identity):
                raise UserError("method.pre_dim: simclr_adv builds its own pre-feature and projector; "
                                "set encoder.head_layers = 0 (or method.pre_dim = 0 to use the encoder head)")
            self.pre_feature = nn.Sequential(nn.Linear(encoder.out_dim, o.pre_dim), nn.BatchNorm1d(o.pre_dim),
                                             nn.ReLU(inplace=True))
            self.projector = nn.Sequential(nn.Linear(o.pre_dim, o.hidden_dim), nn.BatchNorm1d(o.hidden_dim),
                                           nn.ReLU(inplace=True), nn.Linear(o.hidden_dim, o.z_dim))

    def embed(self, x: Tensor) -> Tensor:
        z = self.encoder(x)
        return z if self.pre_feature is None else self.projector(self.pre_feature(z))

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        tau, embed = self.options.temperature, self.embed
        views = self.replayed(lambda: multi_view(images, self.augment, 2))
        x1, x2 = views[0::2], views[1::2]
        adv, extra = self.adversarial(x2, lambda xa: nt_xent(pair_rows(embed(x2), embed(xa)), tau))
        loss = nt_xent(pair_rows(embed(x1), embed(adv)), tau)
        return (loss if extra is None else loss + extra), {"loss_adv": loss.detach()}

    def eval_features(self, x: Tensor, route: str) -> Tensor:
        if self.pre_feature is None:
            return super().eval_features(x, route)
        return self.pre_feature(self.encoder.features(x, route))


@hookimpl
def rsslctl_methods() -> list[type]:
    return [SimCLRAdv]
