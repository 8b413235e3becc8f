"""`rsslctl import`: turn a released checkpoint of a reference implementation into an rsslctl run directory.

Reads the ``.pt`` file with torch's weights-only unpickler (never an unrestricted one), recognises its key
layout, builds the rsslctl model a matching recipe describes, maps every key onto it and loads strictly, then
writes ``recipe.toml`` + one safetensors checkpoint whose meta records the source path, its sha256 and the
format. ``evaluate``, ``finetune`` and ``export`` then work on the directory unchanged.

Key layouts of the reference code (read from the authors' repositories):

* ResNet layout (ACL, DynACL/DynACL++, AIR, RCS and the RobustSSL model zoo; all four repositories share one
  model file): ``normalize.{mean,std}``; ``conv1`` (3×3 CIFAR stem, 7×7 ImageNet stem for STL-10 at 96 px);
  every BN as ``<bn>.bn_list.{0,1}.*`` (0 = normal, 1 = pgd; a single entry when trained without the dual
  stream); the downsample branch as ``downsample.conv`` / ``downsample.bn``; the projection head as
  ``fc.fc{1,2,3}`` / ``fc.bn{1,2,3}`` (two layers with ``--twoLayerProj``). The official DynACL saves its
  query and key encoders together as ``encoder_q.*`` / ``encoder_k.*``. Fine-tuned files (DynACL++) carry a
  linear classifier ``fc.weight``/``fc.bias`` instead of the head and, when single-BN, torchvision names
  (``bn1.weight``, ``downsample.0/1``). Narrowed networks (the stem as wide as the first stage, as the reference
  code builds them when its widths are changed) import with ``backbone.stem_width`` = the width of ``conv1``.
* EMP layout (EMP-SSL, CF-AMC-SSL): a torchvision ResNet under ``backbone.``, ``pre_feature.{0,1}`` and
  ``projection.{0,1,3}``.

Checkpoints are a plain state dict or one under ``state_dict_dual``, ``state_dict`` or ``model`` (the keys the
RobustSSL benchmark tries, in that order); an ``nn.DataParallel`` ``module.`` prefix is stripped.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import click

from rsslctl import UserError, hookimpl, user_errors

FORMATS = ("acl", "dynacl", "air", "rcs", "empssl", "cf_amc_ssl", "mae")
#: formats whose released files share a key layout; ``--format auto`` can only pick when one format is left
LAYOUT_FORMATS = {"resnet": ("acl", "air", "dynacl", "rcs"), "momentum": ("dynacl",), "emp": ("empssl", "cf_amc_ssl"),
                  "mae": ("mae",)}
LAYOUT_NAMES = {"resnet": "reference dual-BN ResNet (conv1, layer*, bn_list, fc.fc*)",
                "momentum": "official DynACL query/key encoder (encoder_q., encoder_k.)",
                "emp": "EMP-SSL (backbone., pre_feature., projection.)",
                "mae": "MAE ViT (patch_embed., cls_token, pos_embed, blocks., norm.)"}
CONTAINER_KEYS = ("state_dict_dual", "state_dict", "model")
#: (block, blocks per stage) → timm model
RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
           ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
           ("bottleneck", (3, 8, 36, 3)): "resnet152"}
DEFAULT_CHANNELS = (64, 128, 256, 512)
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")


# -- reading -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Source:
    """A checkpoint file read safely: its state dict (``module.`` prefix removed) and where it came from."""

    path: Path
    sha256: str
    state: dict[str, Any]
    names: dict[str, str]  # key in ``state`` → key as written in the file (for error messages)
    container: str
    epoch: int | None


def _unpickler_detail(exc: Exception) -> str:
    """The weights-only unpickler's own reason, without torch's advice to switch it off."""
    inner = exc.__context__ or exc.__cause__
    text = str(inner) if inner is not None else str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    return " ".join((found.group(1) if found else text).split()) or type(exc).__name__


def read_checkpoint(path: Path) -> Source:
    """Load ``path`` with ``torch.load(weights_only=True)``; anything needing a full unpickler is refused."""
    import hashlib
    import pickle

    import torch
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    data = path.read_bytes()  # hash exactly the bytes that are imported
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol notes would break the one-line error output
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:  # a class or function to import: only an unrestricted unpickler would, and that can run code
            raise UserError(f"{path}: refusing to load: it asks to import '{found.group(1)}', which needs an "
                            "unrestricted unpickler (able to run arbitrary code); rsslctl reads weights only - "
                            "re-save just the state dict (tensors) from a trusted environment") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint for the weights-only unpickler "
                        f"({_unpickler_detail(exc)}); rsslctl never falls back to an unrestricted one") from None
    except Exception as exc:  # truncated zip, text file, ...
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    container = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), "")
    state = obj[container] if container else obj
    epoch = obj.get("epoch") if container else None
    for key, value in state.items():
        if not isinstance(key, str):
            raise UserError(f"{path}: entry {key!r} is keyed by a {type(key).__name__}, not a name; a state dict names "
                            "each tensor with a string (e.g. 'conv1.weight'): re-save model.state_dict()")
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor; expected a state dict, "
                            f"plain or under {', '.join(repr(k) for k in CONTAINER_KEYS)}")
        check_tensor(value, key, path)
    names: dict[str, str] = {}
    stripped: dict[str, Any] = {}
    for key, value in state.items():
        short = key.removeprefix("module.")  # nn.DataParallel (AIR's ResNet-50, EMP-SSL, CF-AMC-SSL)
        if short in stripped:
            raise UserError(f"{path}: keys '{names[short]}' and '{key}' are the same once 'module.' is removed")
        stripped[short], names[short] = value, key
    if not stripped:
        raise UserError(f"{path}: the state dict is empty")
    return Source(path, digest, stripped, names, container or "plain",
                  epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else None)


def check_tensor(value: Any, key: str, path: Path) -> None:
    """A weight must be a dense real tensor holding finite data: the model's copy would fail on a sparse or meta
    tensor, silently drop a complex one's imaginary part, and carry NaN/inf into every result."""
    import torch
    if value.layout != torch.strided:
        raise UserError(f"{path}: entry '{key}' is a sparse tensor ({value.layout}); re-save it dense "
                        "(tensor.to_dense()) from the reference code")
    if value.is_meta:
        raise UserError(f"{path}: entry '{key}' is a meta tensor (a shape without data, e.g. saved from a model "
                        "built on device='meta'); re-save the state dict of the trained model")
    if value.is_complex():
        raise UserError(f"{path}: entry '{key}' is complex ({value.dtype}); model weights are real, and casting "
                        "would drop the imaginary part: re-save the real weights")
    if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
        raise UserError(f"{path}: entry '{key}' holds NaN or infinite values; the checkpoint is damaged or its "
                        "training diverged: import an earlier checkpoint")


def detect_layout(source: Source) -> str:
    keys = source.state.keys()
    if any(k.startswith("encoder_q.") for k in keys) and any(k.startswith("encoder_k.") for k in keys):
        return "momentum"
    if any(k.startswith("pre_feature.") for k in keys) and any(k.startswith("backbone.") for k in keys):
        return "emp"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "resnet"
    if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "mae"
    if any(k.startswith("block1.layer.") for k in keys):
        raise UserError(f"{source.path}: a WideResNet (block1.layer.*, the ImageNet-32 model of the RCS repository); "
                        "rsslctl imports ResNet checkpoints only")
    first = ", ".join(list(source.names.values())[:3])
    raise UserError(f"{source.path}: unrecognised key layout (first keys: {first}); expected a reference ResNet "
                    "(conv1, layer1.*, fc.fc1.*), EMP-SSL (backbone.*, pre_feature.*, projection.*) or MAE "
                    "(patch_embed.*, blocks.*, under 'model') state dict")


def pick_format(requested: str, layout: str, path: Path) -> str:
    candidates = LAYOUT_FORMATS[layout]
    if requested == "auto":
        if len(candidates) == 1:
            return candidates[0]
        raise UserError(f"{path}: --format auto is ambiguous: the {LAYOUT_NAMES[layout]} layout is written by "
                        f"{', '.join(candidates)}; pass --format with one of them")
    if requested not in candidates:
        raise UserError(f"{path}: has the {LAYOUT_NAMES[layout]} layout, which --format {requested} does not use; "
                        f"it fits --format {' or '.join(candidates)}")
    return requested


# -- architecture ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ResNetArch:
    """What the weights say about the backbone and head (no guessing from the file name)."""

    model: str
    cifar_stem: bool
    stem: int  # output channels of conv1
    channels: tuple[int, ...]
    routes: int = 0  # 2 = dual BN, 1 = single route under bn_list.0, 0 = plain BN
    head: tuple[int, ...] = ()  # output width of each projection-head linear layer; () = none

    def backbone_table(self) -> dict[str, Any]:
        table: dict[str, Any] = {"name": "timm", "model": self.model, "cifar_stem": self.cifar_stem}
        if self.cifar_stem:  # recorded even at timm's 64: the file decides it
            table["stem_width"] = self.stem
        if self.channels != DEFAULT_CHANNELS:
            table["model_kwargs"] = {"channels": list(self.channels)}
        return table


def infer_resnet(state: dict[str, Any], where: str) -> ResNetArch:
    """Model, stem and stage widths of a ResNet state dict in torchvision/reference names (no BN routes, no head)."""
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        raise UserError(f"{where}: no 4-d 'conv1.weight'; not a ResNet state dict")
    kernel, stem = int(conv1.shape[-1]), int(conv1.shape[0])
    if kernel not in (3, 7):
        raise UserError(f"{where}: stem convolution {kernel}×{kernel}; only the 3×3 CIFAR stem and the 7×7 ImageNet "
                        "stem map onto timm ResNets")
    if kernel == 7 and stem != 64:  # backbone.stem_width resizes the 3×3 CIFAR stem only
        raise UserError(f"{where}: a 7×7 ImageNet stem {stem} channels wide; rsslctl builds that stem 64 wide, "
                        "other stem widths only with the 3×3 CIFAR stem (backbone.stem_width)")
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    layers, channels = [], []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state for m in [re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", k)] if m}
        if not blocks or blocks != set(range(len(blocks))):
            raise UserError(f"{where}: stage layer{stage} has blocks {sorted(blocks)}; expected 0, 1, ...")
        layers.append(len(blocks))
        channels.append(int(state[f"layer{stage}.0.conv1.weight"].shape[0]))
    model = RESNETS.get((block, tuple(layers)))
    if model is None:
        raise UserError(f"{where}: {block} blocks {tuple(layers)} per stage match no supported ResNet "
                        f"({', '.join(sorted(set(RESNETS.values())))})")
    return ResNetArch(model, kernel == 3, stem, tuple(channels))


def bn_routes(keys: Any, where: str) -> int:
    routes = {int(m.group(1)) for k in keys for m in [re.search(r"\.bn_list\.(\d+)\.", k)] if m}
    if not routes:
        return 0
    if routes == {0, 1}:
        return 2
    if routes == {0}:
        return 1
    raise UserError(f"{where}: BN routes {sorted(routes)}; the reference dual BN has routes 0 (normal) and 1 (pgd)")


def infer_head(state: dict[str, Any], where: str) -> tuple[int, ...]:
    layers = sorted(int(m.group(1)) for k in state for m in [re.fullmatch(r"fc\.fc(\d+)\.weight", k)] if m)
    if layers != list(range(1, len(layers) + 1)):
        raise UserError(f"{where}: projection head layers fc.fc{layers}; expected fc.fc1, fc.fc2, ...")
    return tuple(int(state[f"fc.fc{n}.weight"].shape[0]) for n in layers)


def resnet_arch(state: dict[str, Any], where: str) -> ResNetArch:
    backbone = {k: v for k, v in state.items() if not k.startswith(("fc.", "normalize."))}
    return dataclasses.replace(infer_resnet(backbone, where), routes=bn_routes(state, where),
                               head=infer_head(state, where))


# -- key mapping -------------------------------------------------------------------------------------------------


def map_resnet_key(key: str, routes: int) -> str | None:
    """Encoder key (relative to ``Encoder``) for a reference ResNet-layout key; None for the dropped classifier."""
    if key in CLASSIFIER_KEYS:
        return None
    if key in ("normalize.mean", "normalize.std"):
        return key.split(".")[1]
    head = re.fullmatch(r"fc\.(fc|bn)(\d+)\.(.+)", key)
    if head:  # ProjectionHead is Linear, BN, ReLU per layer: Linear n at 3(n-1), its BN right after
        kind, n, rest = head.groups()
        key = f"head.{3 * (int(n) - 1) + (kind == 'bn')}.{rest}"
    else:  # timm names the shortcut downsample.0 (conv) / .1 (BN)
        key = "backbone." + key
        key = key.replace(".downsample.conv.", ".downsample.0.").replace(".downsample.bn.", ".downsample.1.")
        key = key.replace(".shortcut.", ".downsample.")
    if routes == 1:  # one route kept as plain BN (encoder.dual_bn = "off")
        key = key.replace(".bn_list.0.", ".")
    elif routes == 0:  # reference BN built without route names keeps its BN under a bare bn_list
        key = key.replace(".bn_list.", ".")
    return key


def map_emp_key(key: str) -> str:
    """Method key for an EMP-layout key: torchvision and timm ResNets share their module names."""
    for prefix, ours in (("backbone.", "encoder.backbone."), ("pre_feature.", "pre_feature."),
                         ("projection.", "projector.")):
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    return key


# -- recipes -------------------------------------------------------------------------------------------------------

#: format → the shipped recipe (recipes/*.toml) of the reference code's pretraining, so an imported run says how its
#: weights were trained; the file only decides the architecture tables. No rcs.toml ships: RCS here selects coresets
#: for ACL (ACL-RCS) with the RCS reference schedule below; DynACL-RCS weights import the same.
SHIPPED = {"acl": "acl", "dynacl": "dynacl", "air": "dynacl_air", "rcs": "acl", "empssl": "empssl",
           "cf_amc_ssl": "cf_amc_ssl", "mae": "mae_imagenet"}
RCS_CORESET = {"name": "rcs", "fraction": 0.2, "warmup_epochs": 100, "every": 20}


def shipped_tables(fmt: str) -> dict[str, dict[str, Any]]:
    """The tables of ``fmt``'s shipped recipe, copied so the caller may change them; [engine] (how this machine
    runs: device, compile) is left to the defaults, it says nothing about the weights."""
    from rsslctl import load_raw
    raw = load_raw(SHIPPED[fmt])
    return {table: dict(values) for table, values in raw.items() if isinstance(values, dict) and table != "engine"}


def architecture_table(shipped: dict[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    """The shipped [backbone] (its init options) with every architecture key taken from the file instead."""
    table = {k: v for k, v in shipped.items() if k not in ("model", "cifar_stem", "stem_width", "model_kwargs")}
    return {**table, **arch}


def _f32(values: Any) -> list[float]:
    """Shortest decimals that give back the file's float32 values, so recipe.toml rebuilds the same buffers."""
    import numpy as np
    out = []
    for v in values:
        v32 = np.float32(v)
        out.append(next(float(t) for p in range(1, 10) if np.float32(t := f"{float(v32):.{p}g}") == v32))
    return out


def resnet_recipe(fmt: str, arch: ResNetArch, momentum: bool, mean_std: tuple | None) -> dict[str, Any]:
    raw = shipped_tables(fmt)
    if not arch.cifar_stem:  # the reference repositories use the ImageNet stem only for STL-10 at 96 px
        raw["data"] = {"name": "stl10", "image_size": 96}
    raw["backbone"] = architecture_table(raw.get("backbone", {}), arch.backbone_table())
    encoder: dict[str, Any] = {**raw.get("encoder", {}), "dual_bn": "on" if arch.routes == 2 else "off",
                               "head_layers": len(arch.head)}
    if arch.head:
        encoder.update(head_hidden=arch.head[0], head_dim=arch.head[-1])
    if mean_std:
        encoder.update(mean=_f32(mean_std[0]), std=_f32(mean_std[1]))
    raw["encoder"] = encoder
    if fmt == "dynacl":  # the official code's EMA key encoder, when the file holds one
        raw["method"]["momentum_encoder"] = momentum
    elif fmt == "rcs":
        raw["coreset"] = dict(RCS_CORESET)
    return raw


def emp_recipe(fmt: str, backbone: dict[str, Any], dims: dict[str, int]) -> dict[str, Any]:
    raw = shipped_tables(fmt)
    raw["backbone"] = architecture_table(raw.get("backbone", {}), backbone)
    raw["method"].update(dims)
    return raw


# -- the conversion --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """How one file becomes one run: recipe tables and (file key, model key or None = dropped) pairs."""

    fmt: str
    raw: dict[str, Any]
    pairs: list[tuple[str, str | None]]
    derived: tuple[str, ...]  # model keys the recipe supplies (not in the file)
    notes: dict[str, Any]


def plan_resnet(source: Source, fmt: str, layout: str) -> Plan:
    where = str(source.path)
    if layout == "momentum":
        parts = {"encoder_q.": "encoder.", "encoder_k.": "key_encoder."}
        for key in source.state:
            if not key.startswith(tuple(parts)):
                raise UserError(f"{where}: key '{source.names[key]}' does not map: the official DynACL layout holds "
                                "only encoder_q.* and encoder_k.*")
        sub = {p: {k[len(p):]: v for k, v in source.state.items() if k.startswith(p)} for p in parts}
        arch = resnet_arch(sub["encoder_q."], where)
        pairs = [(p + k, (None if (d := map_resnet_key(k, arch.routes)) is None else parts[p] + d))
                 for p in parts for k in sub[p]]
        state = sub["encoder_q."]
    else:
        arch = resnet_arch(source.state, where)
        pairs = [(k, (None if (d := map_resnet_key(k, arch.routes)) is None else "encoder." + d)) for k in source.state]
        state = source.state
    has_norm = "normalize.mean" in state and "normalize.std" in state
    if has_norm and not bool((state["normalize.std"] > 0).all()):
        name = source.names[("encoder_q." if layout == "momentum" else "") + "normalize.std"]
        raise UserError(f"{where}: entry '{name}' = {state['normalize.std'].flatten().tolist()}: every value must be "
                        "> 0 (it divides the input); the file's normalisation is damaged")
    mean_std = ((state["normalize.mean"].flatten().tolist(), state["normalize.std"].flatten().tolist()) if has_norm
                else None)
    raw = resnet_recipe(fmt, arch, layout == "momentum", mean_std)
    encoders = ("encoder.", "key_encoder.") if layout == "momentum" else ("encoder.",)
    derived = () if has_norm else tuple(e + s for e in encoders for s in ("mean", "std"))
    notes = {"layout": layout, "backbone": raw["backbone"], "bn_routes": arch.routes,
             "head_layers": len(arch.head), "input_normalisation": "from the file" if has_norm else
             "not in the file: the recipe's encoder.mean/std (ImageNet statistics, as the reference code)"}
    if arch.routes < 2:
        notes["single_bn"] = "imported with encoder.dual_bn = off (the file has one BN route)"
    if layout == "resnet" and fmt == "dynacl":
        notes["encoder"] = "one encoder in the file (the key encoder of the official code); momentum_encoder = false"
    return Plan(fmt, raw, pairs, derived, notes)


def plan_emp(source: Source, fmt: str) -> Plan:
    where = str(source.path)
    backbone = {k[len("backbone."):]: v for k, v in source.state.items() if k.startswith("backbone.")}
    arch = infer_resnet(backbone, where)
    routes = bn_routes(backbone, where)
    if routes:
        raise UserError(f"{where}: key '{next(source.names[k] for k in source.state if '.bn_list.' in k)}' does not "
                        "map: EMP-SSL backbones have plain BN")
    table = arch.backbone_table()
    dims = {}
    for option, key in (("pre_dim", "pre_feature.0.weight"), ("hidden_dim", "projection.0.weight"),
                        ("z_dim", "projection.3.weight")):
        if key not in source.state:
            raise UserError(f"{where}: no '{key}'; the EMP-SSL layout has pre_feature.0/1 and projection.0/1/3")
        dims[option] = int(source.state[key].shape[0])
    raw = emp_recipe(fmt, table, dims)
    pairs = [(k, map_emp_key(k)) for k in source.state]
    notes = {"layout": "emp", "backbone": table, "bn_routes": 0, "heads": dims,
             "input_normalisation": f"not in the file: {fmt} recipe values {raw['encoder']['mean'][0]}/"
                                    f"{raw['encoder']['std'][0]}"}
    return Plan(fmt, raw, pairs, ("encoder.mean", "encoder.std"), notes)


# -- MAE (facebookresearch/mae: models_mae.py; checkpoints saved as {"model": state_dict}) ------------------------

#: the released encoders: (width, depth, heads, patch) → timm model (all at 224 px, MLP ratio 4, 3 channels)
MAE_VITS = {(768, 12, 12, 16): "vit_base_patch16_224", (1024, 24, 16, 16): "vit_large_patch16_224",
            (1280, 32, 16, 14): "vit_huge_patch14_224"}
MAE_DECODER_PARTS = {"mask_token": "decoder.mask_token", "decoder_embed.": "decoder.embed.",
                     "decoder_blocks.": "decoder.blocks.", "decoder_norm.": "decoder.norm.",
                     "decoder_pred.": "decoder.pred."}


def _need(state: dict[str, Any], key: str, dims: int, where: str) -> Any:
    value = state.get(key)
    if value is None or value.dim() != dims:
        raise UserError(f"{where}: no {dims}-d '{key}'; an MAE checkpoint has patch_embed.proj, cls_token, pos_embed, "
                        "blocks.* and norm.*")
    return value


def _depth(state: dict[str, Any], prefix: str, where: str) -> int:
    found = {int(m.group(1)) for k in state for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m}
    if not found or found != set(range(len(found))):
        raise UserError(f"{where}: transformer blocks {prefix}.{sorted(found)}; expected {prefix}.0, {prefix}.1, ...")
    return len(found)


def _heads(width: int, head_width: int) -> int:
    """Attention heads are not stored in a checkpoint: the authors' heads are 64 wide in the encoder (ViT-H: 80) and
    32 in the decoder (512 wide, 16 heads); narrower models get one head."""
    return width // head_width if width % head_width == 0 and width >= head_width else 1


def mae_architecture(state: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, int], int]:
    """([backbone] table, MAE decoder options ({} when the file has no decoder), image side) from the shapes."""
    if any(k.startswith(("head.", "fc_norm.")) for k in state):
        raise UserError(f"{where}: a fine-tuned MAE classifier (head.*, fc_norm.*); import the pretraining checkpoint "
                        "(encoder, with or without the decoder) and fine-tune it with `rsslctl finetune`")
    proj = _need(state, "patch_embed.proj.weight", 4, where)
    dim, channels, patch = (int(n) for n in proj.shape[:3])
    if proj.shape[2] != proj.shape[3]:
        raise UserError(f"{where}: patch_embed.proj.weight {tuple(proj.shape)}: patches must be square")
    pos = _need(state, "pos_embed", 3, where)
    side = math.isqrt(int(pos.shape[1]) - 1)
    if pos.shape[0] != 1 or pos.shape[2] != dim or side * side != pos.shape[1] - 1 or side < 1:
        raise UserError(f"{where}: pos_embed {tuple(pos.shape)}; expected [1, 1 + n², {dim}] (class token + a square "
                        "patch grid)")
    depth = _depth(state, "blocks", where)
    hidden = int(_need(state, "blocks.0.mlp.fc1.weight", 2, where).shape[0])
    heads = 16 if dim == 1280 else _heads(dim, 64)
    model = MAE_VITS.get((dim, depth, heads, patch)) if (side * patch, hidden, channels) == (224, 4 * dim, 3) else None
    table: dict[str, Any] = {"name": "timm", "model": model or "vit_base_patch16_224", "cifar_stem": False}
    if model is None:
        kwargs: dict[str, Any] = {"img_size": side * patch, "patch_size": patch, "embed_dim": dim, "depth": depth,
                                  "num_heads": heads}
        if hidden != 4 * dim:
            kwargs["mlp_ratio"] = hidden / dim
        if channels != 3:
            kwargs["in_chans"] = channels
        table["model_kwargs"] = kwargs
    decoder: dict[str, int] = {}
    if any(k.startswith(tuple(MAE_DECODER_PARTS)) for k in state):
        width = int(_need(state, "decoder_embed.weight", 2, where).shape[0])
        decoder = {"decoder_width": width, "decoder_depth": _depth(state, "decoder_blocks", where),
                   "decoder_heads": _heads(width, 32)}
        dec_hidden = int(_need(state, "decoder_blocks.0.mlp.fc1.weight", 2, where).shape[0])
        if dec_hidden != 4 * width:
            raise UserError(f"{where}: decoder MLP {dec_hidden} wide for a {width}-wide decoder; rsslctl's MAE "
                            "decoder has the authors' MLP ratio 4")
    return table, decoder, side * patch


def map_mae_key(key: str) -> str | None:
    """Method key for an MAE key; None for the fixed decoder positions (rebuilt from the shapes, checked equal)."""
    if key == "decoder_pos_embed":
        return None
    for ref, ours in MAE_DECODER_PARTS.items():
        if key.startswith(ref):
            return ours + key[len(ref):]
    return "encoder.backbone." + key


def plan_mae(source: Source) -> Plan:
    where = str(source.path)
    table, decoder, image = mae_architecture(source.state, where)
    raw = shipped_tables("mae")
    raw["backbone"] = architecture_table(raw.get("backbone", {}), table)
    raw["data"]["image_size"] = image
    raw["method"].update(decoder)
    pairs = [(k, map_mae_key(k)) for k in source.state]
    derived = ("encoder.mean", "encoder.std") + (() if decoder else ("decoder.",))
    notes: dict[str, Any] = {
        "layout": "mae", "backbone": raw["backbone"],
        "attention_heads": f"{table.get('model_kwargs', {}).get('num_heads') or 'those of ' + table['model']} "
                           "(not stored in the file; the authors' ViT-B/L/H use 12/16/16)",
        "decoder": (f"from the file ({decoder['decoder_width']} wide, {decoder['decoder_depth']} blocks, "
                    f"{decoder['decoder_heads']} heads)") if decoder else
                   "not in the file (an encoder-only release): freshly initialised; evaluate/finetune use the encoder",
        "input_normalisation": "not in the file: the recipe's encoder.mean/std (ImageNet statistics, as the authors')"}
    if "decoder_pos_embed" in source.state:
        notes["dropped_why"] = "decoder_pos_embed: the fixed sin-cos table, rebuilt from the shapes (checked equal)"
    return Plan("mae", raw, pairs, derived, notes)


def check_mae_positions(source: Source, method: Any) -> None:
    """The file's fixed sin-cos tables must be the ones rsslctl's MAE builds, or reconstructions would differ."""
    import torch
    ref = source.state.get("decoder_pos_embed")
    if ref is None:
        return
    ours = method.decoder.pos  # [1, class token + L, width], the class token's row 0 as theirs
    if tuple(ref.shape) != tuple(ours.shape):
        raise UserError(f"{source.path}: decoder_pos_embed has shape {tuple(ref.shape)}, but the decoder's fixed "
                        f"positions have {tuple(ours.shape)}")
    if not torch.allclose(ref.float(), ours, rtol=0, atol=1e-5):
        raise UserError(f"{source.path}: decoder_pos_embed is not the fixed 2-D sin-cos table of the authors' MAE "
                        "(util/pos_embed.py); rsslctl rebuilds that table and cannot import another")


def build_and_load(source: Source, plan: Plan, overrides: list[str]) -> tuple[Any, Any, list[str]]:
    """(recipe, method holding the file's weights, dropped file keys); strict: every key in, every weight set."""
    import torch

    from rsslctl import build_method, resolve
    where = str(source.path)
    raw = plan.raw
    if source.epoch is not None and source.epoch > raw["schedule"].get("epochs", 0):
        raw["schedule"]["epochs"] = source.epoch
    recipe = resolve(raw, overrides, "import")
    method = build_method(recipe, torch.device("cpu"))
    target = method.state_dict()
    mapped: dict[str, Any] = {}
    filled_by: dict[str, str] = {}
    dropped: list[str] = []
    for key, dest in plan.pairs:
        name = source.names[key]
        if dest is None:
            dropped.append(name)
            continue
        if dest not in target:
            raise UserError(f"{where}: key '{name}' does not map onto the {plan.fmt} model (it would be '{dest}', "
                            "which the model does not have)")
        if dest in filled_by:
            raise UserError(f"{where}: keys '{filled_by[dest]}' and '{name}' both map to '{dest}'")
        value, want = source.state[key], target[dest]
        if tuple(value.shape) != tuple(want.shape) and not (dest.endswith((".mean", ".std"))
                                                            and value.numel() == want.numel()):
            raise UserError(f"{where}: key '{name}' has shape {tuple(value.shape)}, but '{dest}' of the {plan.fmt} "
                            f"model has {tuple(want.shape)}; check --set overrides of the architecture")
        mapped[dest] = value.reshape(want.shape).to(want.dtype)  # normalize.* is [3], ours [1, 3, 1, 1]
        filled_by[dest] = name
    derived = set(plan.derived)
    prefixes = tuple(d for d in derived if d.endswith(".")) + ("extra.",)  # whole modules the file leaves to the recipe
    missing = [k for k in target if k not in mapped and k not in derived and not k.startswith(prefixes)]
    if missing:  # ``extra.``: buffers of EMP-SSL's augmentation modules, recipe state, not weights
        raise UserError(f"{where}: the file has no weights for '{missing[0]}' of the {plan.fmt} model "
                        f"({len(missing)} missing in all); the checkpoint is incomplete")
    method.load_state_dict({**target, **mapped}, strict=True)
    return recipe, method, dropped


def write_run(out: Path, recipe: Any, method: Any, epoch: int, meta: dict[str, Any], force: bool) -> None:
    """Assemble the run directory beside ``out`` and move it into place, so a failure leaves nothing half-written."""
    from rsslctl import make_optimizer, prepare_run_dir, save_checkpoint
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.import-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        prepare_run_dir(recipe, tmp, force=True)
        # a fresh optimizer: the reference optimizer state is not imported (its LARS is not ours)
        optimizer = make_optimizer(method.parameter_groups(), recipe.optimizer)  # the groups a resume builds
        save_checkpoint(tmp, epoch, method, optimizer, meta, keep=1)
        if out.exists():
            if any(out.iterdir()) and not force:  # appeared while we worked
                raise UserError(f"{out}: run directory already exists; pass --force to replace it")
            from rsslctl import RunLock, check_replaceable
            check_replaceable(out)
            with RunLock(out, "being replaced by an import"):  # not while another process writes it
                shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_out(path: Path, out: Path, force: bool) -> None:
    """Fail before any work if ``out`` is unusable; never write into (or delete) the input."""
    src, dst = path.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise UserError(f"--out {out}: holds the input file {path}; choose a new directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: run directory already exists; pass --force to replace it")
    from rsslctl import check_replaceable
    check_replaceable(out)


def import_checkpoint(path: Path, fmt: str, out: Path, overrides: list[str] = (), force: bool = False
                      ) -> dict[str, Any]:
    """Convert ``path`` into the run directory ``out``; returns the import record stored in the checkpoint meta."""
    from rsslctl import plugin_versions
    path, out = Path(path), Path(out)
    check_out(path, out, force)
    source = read_checkpoint(path)
    layout = detect_layout(source)
    fmt = pick_format(fmt, layout, path)
    plan = (plan_emp(source, fmt) if layout == "emp" else plan_mae(source) if layout == "mae"
            else plan_resnet(source, fmt, layout))
    plan.raw["run"] = {**plan.raw.get("run", {}), "name": out.name, "output_dir": str(out.parent)}
    if any(o.replace(" ", "").startswith("data.name=") for o in overrides):  # another dataset: the shipped
        plan.raw["data"] = {k: v for k, v in plan.raw["data"].items() if k == "image_size"}  # one's keys are its own
    recipe, method, dropped = build_and_load(source, plan, list(overrides))
    if layout == "mae":
        check_mae_positions(source, method)
    record = {"imported_from": str(path.resolve()), "sha256": source.sha256, "format": fmt,
              "container": source.container, "dataparallel_prefix": any(n.startswith("module.")
                                                                          for n in source.names.values()),
              "source_epoch": source.epoch, "tensors": len(source.state), "dropped": dropped, **plan.notes}
    if dropped and "dropped_why" not in record:
        record["dropped_why"] = "a fine-tuned linear classifier; rsslctl runs hold encoders, fine-tune again"
    epoch = source.epoch if source.epoch is not None else 0
    # under "import": the checkpoint's own "sha256" entry holds the digests of its safetensors files
    meta = {"recipe": recipe.resolved, "plugins": plugin_versions(recipe), "import": record}
    write_run(out, recipe, method, epoch, meta, force)
    return record


# -- command ---------------------------------------------------------------------------------------------------------


def _run(file: Path, fmt: str, out_dir: Path, overrides: tuple[str, ...], force: bool, quiet: bool) -> None:
    from rsslctl import console, summary_table
    record = import_checkpoint(file, fmt, out_dir, list(overrides), force)
    if quiet:
        return
    bb = record["backbone"]
    stem = f" (CIFAR stem, {bb['stem_width']} wide)" if bb.get("cifar_stem") else ""
    kwargs = bb.get("model_kwargs", {})
    rows = {
        "format": f"{record['format']} ({record['layout']} layout, {record['container']} container"
                  f"{', DataParallel prefix removed' if record['dataparallel_prefix'] else ''})",
        "sha256": record["sha256"][:16] + "… (all of it in the checkpoint's meta.json)",
        "backbone": f"{bb['model']}{stem}{' channels ' + str(kwargs['channels']) if 'channels' in kwargs else ''}"
                    f"{' ' + str(kwargs) if kwargs and 'channels' not in kwargs else ''}"}
    if "bn_routes" in record:
        rows["BN"] = {2: "dual (normal, pgd)", 1: "one route, imported as single BN", 0: "single"}[record["bn_routes"]]
    else:
        rows.update({"attention heads": record["attention_heads"], "decoder": record["decoder"]})
    rows.update({"input normalisation": record["input_normalisation"],
                 "dropped": ", ".join(record["dropped"]) or "nothing",
                 "next": f"rsslctl evaluate {out_dir}; rsslctl finetune {out_dir} --mode SLF"})
    console.print(summary_table(f"imported {file} into {out_dir}", rows))


@click.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice((*FORMATS, "auto")), default="auto", show_default=True,
              help="Which reference implementation wrote FILE (mae: the official MAE pretraining checkpoints); "
                   "auto decides from the keys when only one fits.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Run directory to create (must not exist or be empty, unless --force).")
@click.option("--set", "overrides", multiple=True, metavar="KEY.SUB=VALUE",
              help="Override a value of the generated recipe, e.g. --set data.name=cifar100 (repeatable).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out directory.")
@click.option("--quiet", is_flag=True, help="No summary table.")
def import_command(**kwargs: Any) -> None:
    """Convert a released reference checkpoint (.pt) into an rsslctl run directory."""
    user_errors(_run)(**kwargs)


@hookimpl
def rsslctl_commands() -> list:
    return [import_command]
