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

from torch import Tensor, nn

from rsslctl import AdversarialTraining, Method, UserError, hookimpl, multi_view, nt_xent, pair_rows
from rsslctl_plugins.methods.options import CITATION, SimCLRAdvOptions


class SimCLRAdv(AdversarialTraining, Method):
    """SimCLR with PGD-AT (or free AT) on the second view."""

    name = "simclr_adv"
    citation = CITATION["simclr_adv"]
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
