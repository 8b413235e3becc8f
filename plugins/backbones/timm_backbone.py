"""Any timm model as a backbone, with the CIFAR stem option for 32×32 ResNets.

timm's ResNets start the last BN weight of every residual block at 0 (``zero_init_last=True``); every reference
ResNet of the robust-SSL papers (ACL, AIR, DynACL, RCS, EMP-SSL, CF-AMC-SSL) starts it at 1, so ``zero_init_last``
defaults to false here and is passed to every model that has the option.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import timm
from torch import nn

from rsslctl import Backbone, UserError, apply_cifar_stem, check_model_kwargs, closest, hookimpl
from rsslctl_plugins.backbones.options import CITATION, TimmOptions


class TimmBackbone(Backbone):
    """timm.create_model(model, num_classes=0, **model_kwargs), optionally with the CIFAR stem."""

    name = "timm"
    citation = CITATION["timm"]
    Options = TimmOptions

    @classmethod
    def check_options(cls, o: TimmOptions, where: str = "backbone") -> None:
        if o.model not in timm.list_models():
            raise UserError(f"{where}.model: unknown timm model '{o.model}'{closest(o.model, timm.list_models())}; "
                            "see `python -c 'import timm; print(timm.list_models())'`")
        check_model_kwargs(o.model_kwargs, f"{where}.model_kwargs")
        if "zero_init_last" in o.model_kwargs:
            raise UserError(f"{where}.model_kwargs: set backbone.zero_init_last instead of model_kwargs.zero_init_last")
        if o.stem_width and not o.cifar_stem:
            raise UserError(f"{where}.stem_width applies to the CIFAR stem; set {where}.cifar_stem = true or "
                            f"{where}.stem_width = 0")
        if o.weights and not Path(o.weights).is_file():
            raise UserError(f"{where}.weights: file not found: {Path(o.weights).resolve()}")

    @staticmethod
    def _create(o: TimmOptions, kwargs: dict[str, Any]) -> nn.Module:
        try:
            return timm.create_model(o.model, pretrained=False, num_classes=0, zero_init_last=o.zero_init_last,
                                     **kwargs)
        except TypeError as exc:
            if "zero_init_last" not in str(exc):
                raise
            # a model without residual blocks (ViT, MobileNet, ...) has no such option
            return timm.create_model(o.model, pretrained=False, num_classes=0, **kwargs)

    def build(self) -> nn.Module:
        o = self.options
        self.check_options(o)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in o.model_kwargs.items()}
        try:
            with warnings.catch_warnings():  # zero-size layers warn from torch's init; refused below in one line
                warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
                model = self._create(o, kwargs)
        except Exception as exc:  # noqa: BLE001 — timm raises many kinds for unusable kwargs (zero channels, …)
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"backbone.model_kwargs: {o.model} cannot be built with {o.model_kwargs} ({why})") from None
        empty = next((n for n, p in model.named_parameters() if p.numel() == 0), None)
        if empty is not None:
            raise UserError(f"backbone.model_kwargs: {o.model_kwargs} gives {o.model} a layer without weights "
                            f"({empty}); use positive sizes")
        if o.cifar_stem:
            apply_cifar_stem(model, o.stem_width, o.stem_init)
        if o.weights:
            from safetensors.torch import load_file
            try:
                missing, unexpected = model.load_state_dict(load_file(o.weights), strict=False)
            except Exception as exc:  # noqa: BLE001 — not safetensors, or tensors of the wrong shape
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise UserError(f"backbone.weights: {o.weights} cannot be loaded into {o.model} ({why})") from None
            if missing or unexpected:
                raise UserError(f"backbone.weights: {o.weights} does not fit {o.model} "
                                f"(missing {len(missing)} keys, unexpected {len(unexpected)}); check "
                                "cifar_stem/model_kwargs")
        return model

    def export_info(self) -> dict[str, Any]:
        return {"library": "timm", "model": self.options.model, "cifar_stem": self.options.cifar_stem,
                "stem_width": self.options.stem_width, "model_kwargs": self.options.model_kwargs}

    def classifier_export(self, num_classes: int) -> tuple[str, str]:
        """timm's own classifier name (``fc`` for ResNets) and a RobustBench-style ``load_model`` module."""
        o = self.options
        prefix = timm.create_model(o.model, pretrained=False).pretrained_cfg.get("classifier", "")
        if not isinstance(prefix, str) or not prefix:
            return "", ""
        stem = ("    model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)  # CIFAR stem\n"
                "    model.maxpool = torch.nn.Identity()\n") if o.cifar_stem else ""
        source = f'''"""A classifier fine-tuned with rsslctl, loadable with timm alone: ``load_model(path)`` takes pixels in [0, 1]."""
import json

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file


def load_model(path: str) -> torch.nn.Module:
    with safe_open(path, "pt") as fh:
        info = json.loads(fh.metadata()["rsslctl"])
    model = timm.create_model({o.model!r}, pretrained=False, num_classes={num_classes}, **{o.model_kwargs!r})
{stem}    model.load_state_dict(load_file(path))
    mean = torch.tensor(info["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info["std"]).view(1, -1, 1, 1)

    class Normalized(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model((x - self.mean) / self.std)

    return Normalized().eval()
'''  # noqa: E501 - the generated module's docstring line is part of the file written
        return prefix, source


@hookimpl
def rsslctl_backbones() -> list[type]:
    return [TimmBackbone]
