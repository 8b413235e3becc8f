"""Any timm model as a backbone, with the CIFAR stem option for 32×32 ResNets."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import timm
from torch import nn

from rsslctl import hookimpl
from rsslctl.encoder import Backbone, apply_cifar_stem
from rsslctl.errors import UserError
from rsslctl.limits import check_model_kwargs
from rsslctl.options import closest, opt


@dataclasses.dataclass
class TimmOptions:
    model: str = opt("resnet18", "timm model name (see timm.list_models())")
    cifar_stem: bool = opt(True, "ResNets: 3×3 stride-1 first conv and no max-pool, for 32×32 inputs")
    model_kwargs: dict = opt({}, "extra keyword arguments for timm.create_model, e.g. {channels = [16, 32, 64, 128]}")
    weights: str = opt("", "optional safetensors file with initial backbone weights (timm key layout)")


class TimmBackbone(Backbone):
    """timm.create_model(model, num_classes=0, **model_kwargs), optionally with the CIFAR stem."""

    name = "timm"
    Options = TimmOptions

    @classmethod
    def check_options(cls, o: TimmOptions, where: str = "backbone") -> None:
        if o.model not in timm.list_models():
            raise UserError(f"{where}.model: unknown timm model '{o.model}'{closest(o.model, timm.list_models())}; "
                            "see `python -c 'import timm; print(timm.list_models())'`")
        check_model_kwargs(o.model_kwargs, f"{where}.model_kwargs")
        if o.weights and not Path(o.weights).is_file():
            raise UserError(f"{where}.weights: file not found: {Path(o.weights).resolve()}")

    def build(self) -> nn.Module:
        o = self.options
        self.check_options(o)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in o.model_kwargs.items()}
        try:
            model = timm.create_model(o.model, pretrained=False, num_classes=0, **kwargs)
        except Exception as exc:  # noqa: BLE001 — timm raises many kinds for unusable kwargs (zero channels, …)
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"backbone.model_kwargs: {o.model} cannot be built with {o.model_kwargs} ({why})") from None
        empty = next((n for n, p in model.named_parameters() if p.numel() == 0), None)
        if empty is not None:
            raise UserError(f"backbone.model_kwargs: {o.model_kwargs} gives {o.model} a layer without weights "
                            f"({empty}); use positive sizes")
        if o.cifar_stem:
            apply_cifar_stem(model)
        if o.weights:
            from safetensors.torch import load_file
            try:
                missing, unexpected = model.load_state_dict(load_file(o.weights), strict=False)
            except Exception as exc:  # noqa: BLE001 — not safetensors, or tensors of the wrong shape
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise UserError(f"backbone.weights: {o.weights} cannot be loaded into {o.model} ({why})") from None
            if missing or unexpected:
                raise UserError(f"backbone.weights: {o.weights} does not fit {o.model} "
                                f"(missing {len(missing)} keys, unexpected {len(unexpected)}); check cifar_stem/model_kwargs")
        return model

    def export_info(self) -> dict[str, Any]:
        return {"library": "timm", "model": self.options.model, "cifar_stem": self.options.cifar_stem,
                "model_kwargs": self.options.model_kwargs}


@hookimpl
def rsslctl_backbones() -> list[type]:
    return [TimmBackbone]
