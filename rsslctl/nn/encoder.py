"""Encoder = in-model normalisation + backbone + projection head, with optional dual batch norm.

Attacks work in [0, 1] pixel space because mean/std normalisation happens inside ``Encoder``.
Dual BN keeps separate statistics and affine parameters for clean ('normal', index 0) and
adversarial ('pgd', index 1) inputs. The BN route keys ``<bn>.bn_list.{0,1}.*`` (and their order)
are those of the reference checkpoints, but the module names around them are not: they follow the
backbone plugin's library (a ResNet shortcut is ``downsample.0`` / ``downsample.1`` where the
references write ``downsample.conv`` / ``downsample.bn``), the projection head is ``head.<i>``
where they write ``fc.fc<n>`` / ``fc.bn<n>``, and the normalisation buffers are ``mean`` / ``std``
of shape [1, C, 1, 1], not ``normalize.mean`` / ``normalize.std``. Released checkpoints therefore
do not load as they are; ``rsslctl import`` converts them into a run directory.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from rsslctl.base.errors import UserError
from rsslctl.base.options import Plugin
from rsslctl.nn.options import IMAGENET_MEAN, IMAGENET_STD, EncoderOptions  # noqa: F401 (re-exported)

ROUTES = ("normal", "pgd")


class Backbone(Plugin):
    """Base class of backbone plugins: ``build()`` returns a module mapping images to [N, D] features."""

    def __init__(self, options: Any) -> None:
        self.options = options

    def build(self) -> nn.Module:
        """Return the feature extractor; it must expose ``num_features``."""
        raise NotImplementedError

    def export_info(self) -> dict[str, Any]:
        """How to rebuild the exported backbone outside rsslctl (stored in the export's metadata)."""
        return {}

    def classifier_export(self, num_classes: int) -> tuple[str, str]:
        """(prefix of the library's own classifier keys, Python source defining ``load_model(path)``) for exporting a
        fine-tuned classifier that loads without rsslctl; ('', '') when the backbone cannot."""
        return "", ""


class DualBatchNorm(nn.Module):
    """Two batch norms behind one module; ``route`` (0 normal, 1 pgd) picks which one a forward uses."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        import copy
        self.bn_list = nn.ModuleList([bn, copy.deepcopy(bn)])
        self.route = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.bn_list[self.route](x)


def convert_dual_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``module`` (recursively, in place) by a DualBatchNorm."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, DualBatchNorm(child))
        else:
            convert_dual_bn(child)
    return module


def apply_cifar_stem(model: nn.Module, width: int = 0, init: Literal["kaiming", "pytorch"] = "kaiming") -> nn.Module:
    """3×3 stride-1 first conv and no max-pool, so 32×32 inputs keep their resolution (ResNet style).

    ``width`` > 0 also sets the stem's width. timm's ResNets keep a 64-channel stem whatever their stage widths, so a
    narrow ResNet (channels 16/32/64/128) gets a 64-wide stem and a 1×1 projection 64 → 16 in its first block. With
    ``width`` the stem, its BN and the first block's input convolution and shortcut take ``width`` channels, and a
    shortcut left with equal widths at stride 1 is dropped: with ``width`` = the first stage width this is the CIFAR
    ResNet of the papers.

    ``init = "kaiming"``: the new stem conv starts Kaiming-normal (fan-out) like the ACL-family ResNets;
    ``"pytorch"``: nn.Conv2d's own default, which EMP-SSL and CF-AMC-SSL get by swapping torchvision's conv1 after
    the model is built.
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise UserError("backbone.cifar_stem: only ResNet-style models with 'conv1' and 'maxpool' support it; "
                        "set backbone.cifar_stem = false")
    stem = width or conv.out_channels
    model.conv1 = nn.Conv2d(conv.in_channels, stem, 3, 1, 1, bias=False)
    if init == "kaiming":
        _kaiming(model.conv1)
    model.maxpool = nn.Identity()
    if stem != conv.out_channels:
        block = getattr(model, "layer1", [None])[0]
        bn = getattr(model, "bn1", None)
        if not isinstance(bn, nn.BatchNorm2d) or not isinstance(getattr(block, "conv1", None), nn.Conv2d):
            raise UserError("backbone.stem_width: needs a ResNet with 'bn1' and 'layer1[0].conv1'")
        model.bn1 = nn.BatchNorm2d(stem, eps=bn.eps, momentum=bn.momentum)
        block.conv1 = _resized_input(block.conv1, stem)
        out = (getattr(block, "conv3", None) or block.conv2).out_channels
        shortcut = getattr(block, "downsample", None)
        if isinstance(shortcut, nn.Sequential) and isinstance(shortcut[0], nn.Conv2d):
            if out == stem and shortcut[0].stride == (1, 1):
                block.downsample = None
            else:
                shortcut[0] = _resized_input(shortcut[0], stem)
        elif shortcut is None and out != stem:  # e.g. a bottleneck whose input width equalled its output width
            block.downsample = nn.Sequential(_kaiming(nn.Conv2d(stem, out, 1, bias=False)), nn.BatchNorm2d(out))
    return model


def _kaiming(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _resized_input(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    """A freshly initialised copy of ``conv`` taking ``channels`` input channels."""
    return _kaiming(nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              bias=conv.bias is not None))


class ProjectionHead(nn.Sequential):
    """ACL head: Linear(bias)→BN→ReLU→[Linear(no bias)→BN→ReLU]…→Linear(no bias)→BN (no ReLU at the end)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int) -> None:
        mods: list[nn.Module] = []
        width = in_dim
        for i in range(layers):
            last = i == layers - 1
            nxt = out_dim if last else hidden
            mods += [nn.Linear(width, nxt, bias=i == 0), nn.BatchNorm1d(nxt)]
            if not last:
                mods.append(nn.ReLU(inplace=True))
            width = nxt
        super().__init__(*mods)


class Encoder(nn.Module):
    """Normalise → backbone → (head). ``forward(x, route)`` takes pixels in [0, 1]."""

    def __init__(self, backbone: nn.Module, options: EncoderOptions, dual_bn: bool) -> None:
        super().__init__()
        c = len(options.mean)
        self.register_buffer("mean", torch.tensor(options.mean).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(options.std).view(1, c, 1, 1))
        self.backbone = backbone
        self.num_features = int(backbone.num_features)
        hidden = options.head_hidden or self.num_features
        self.out_dim = options.head_dim or self.num_features if options.head_layers else self.num_features
        self.head = (ProjectionHead(self.num_features, hidden, self.out_dim, options.head_layers)
                     if options.head_layers else nn.Identity())
        self.dual_bn = dual_bn
        if dual_bn:
            convert_dual_bn(self.backbone)
            convert_dual_bn(self.head)
        self._dual = [m for m in self.modules() if isinstance(m, DualBatchNorm)]
        self._route = 0

    def set_route(self, route: str) -> None:
        index = ROUTES.index(route)
        if index != self._route:
            for m in self._dual:
                m.route = index
            self._route = index

    def features(self, x: Tensor, route: str = "normal") -> Tensor:
        """Backbone features [N, D] (no head)."""
        self.set_route(route)
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: Tensor, route: str = "normal") -> Tensor:
        return self.head(self.features(x, route))


def single_bn_state(module: nn.Module, route: str = "pgd") -> dict[str, Tensor]:
    """State dict of ``module`` with the chosen BN route collapsed into plain BN keys (export/fine-tuning)."""
    return collapse_bn_state(module.state_dict(), route)


def collapse_bn_state(state: dict[str, Tensor], route: str = "pgd") -> dict[str, Tensor]:
    """Keep one BN route of a dual-BN state dict under plain BN keys; other keys pass through."""
    keep = f".bn_list.{ROUTES.index(route)}."
    out = {}
    for key, value in state.items():
        if ".bn_list." in key:
            if keep not in key:
                continue
            key = key.replace(keep, ".")
        out[key] = value
    return out


def has_batch_norm(module: nn.Module) -> bool:
    """Does ``module`` contain a BatchNorm layer (what dual BN duplicates)?"""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def build_encoder(backbone: Backbone, options: EncoderOptions, method_wants_dual_bn: bool) -> Encoder:
    """The encoder of a recipe. Dual BN needs BatchNorm in the backbone: a backbone without any (a vision transformer
    normalises with LayerNorm) is refused with ``dual_bn = "on"``, and with ``"auto"`` falls back to a single route
    with a warning, so a method that prefers dual BN (ACL, ...) still trains on such a backbone."""
    dual = {"auto": method_wants_dual_bn, "on": True, "off": False}[options.dual_bn]
    model = backbone.build()
    if dual and not has_batch_norm(model):
        kind = type(model).__name__
        if options.dual_bn == "on":
            raise UserError(f"encoder.dual_bn = \"on\": the backbone ({kind}) has no BatchNorm layer, so dual BN does "
                            "not apply; set encoder.dual_bn = \"off\"")
        from rsslctl.base.console import err_console
        err_console.print(f"warning: the method asks for dual BN, but the backbone ({kind}) has no BatchNorm layer; "
                          "training with a single route (set encoder.dual_bn = \"off\" to silence this)",
                          highlight=False)
        dual = False
    return Encoder(model, options, dual)
