"""`rsslctl import` of narrowed reference checkpoints, and the generated recipes.

The files are written here in the layout the authors' code saves, with the network their code builds when narrowed:
the stem as wide as the first stage (``inplanes = widths[0]``), so a basic-block ResNet has no shortcut in layer1.0.
That is the CIFAR ResNet rsslctl's narrow recipes build with ``backbone.stem_width``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cli_helpers import assert_user_error, run
from rsslctl.run.build import load_trained_method
from rsslctl.run.directory import load_run_recipe
from rsslctl.run.recipe import load_raw, resolve
from rsslctl.runtime.checkpoint import latest_checkpoint, read_meta

NARROW = (8, 16, 16, 16)
STEM = 64  # the importer refuses narrow stems so far
SHIPPED = {"acl": "acl", "dynacl": "dynacl", "air": "dynacl_air", "rcs": "acl", "empssl": "empssl",
           "cf_amc_ssl": "cf_amc_ssl"}


def _bn(sd: dict, prefix: str, c: int, routes: int, g: torch.Generator) -> None:
    for r in range(routes) if routes else [None]:
        p = f"{prefix}.bn_list.{r}." if r is not None else f"{prefix}."
        sd[p + "weight"] = torch.rand(c, generator=g) + 0.5
        sd[p + "bias"] = torch.randn(c, generator=g) * 0.1
        sd[p + "running_mean"] = torch.randn(c, generator=g) * 0.1
        sd[p + "running_var"] = torch.rand(c, generator=g) + 0.5
        sd[p + "num_batches_tracked"] = torch.tensor(3)


def narrow_resnet(widths: tuple = NARROW, bottleneck: bool = False, routes: int = 2, head: int = 3,
                  shortcut: tuple = ("downsample.conv", "downsample.bn"), seed: int = 0, stem: int = 0) -> dict:
    """A ResNet-18 (or ResNet-50) state dict as the reference code saves it, narrowed: ``inplanes`` starts at the
    first stage width (or ``stem``), conv1 is 3×3, a shortcut exists where stride ≠ 1 or widths differ."""
    g = torch.Generator().manual_seed(seed)
    blocks, expansion = ((3, 4, 6, 3), 4) if bottleneck else ((2, 2, 2, 2), 1)
    inplanes = stem or STEM or widths[0]
    sd: dict[str, torch.Tensor] = {"normalize.mean": torch.tensor([0.4914, 0.4822, 0.4465]),
                                   "normalize.std": torch.tensor([0.2470, 0.2435, 0.2616])}
    sd["conv1.weight"] = torch.randn(inplanes, 3, 3, 3, generator=g) * 0.3
    _bn(sd, "bn1", inplanes, routes, g)
    for stage, (n, planes) in enumerate(zip(blocks, widths), 1):
        for b in range(n):
            p, stride = f"layer{stage}.{b}", (2 if b == 0 and stage > 1 else 1)
            convs = ([(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)] if bottleneck
                     else [(planes, inplanes, 3), (planes, planes, 3)])
            for i, (o, c, k) in enumerate(convs, 1):
                sd[f"{p}.conv{i}.weight"] = torch.randn(o, c, k, k, generator=g) * (2 / (c * k * k)) ** 0.5
                _bn(sd, f"{p}.bn{i}", o, routes, g)
            if stride != 1 or inplanes != planes * expansion:
                sd[f"{p}.{shortcut[0]}.weight"] = torch.randn(planes * expansion, inplanes, 1, 1, generator=g) * 0.3
                _bn(sd, f"{p}.{shortcut[1]}", planes * expansion, routes, g)
            inplanes = planes * expansion
    for n in range(1, head + 1):  # proj_head: fc1 with bias, the others without
        sd[f"fc.fc{n}.weight"] = torch.randn(inplanes, inplanes, generator=g) * 0.3
        if n == 1:
            sd["fc.fc1.bias"] = torch.randn(inplanes, generator=g) * 0.1
        _bn(sd, f"fc.bn{n}", inplanes, routes, g)
    return sd


def narrow_emp(widths: tuple = NARROW, pre: int = 24, hidden: int = 20, z: int = 12) -> dict:
    """EMP-SSL / CF-AMC-SSL: a (narrowed) torchvision ResNet-18 under backbone., the two heads, saved from
    nn.DataParallel."""
    g = torch.Generator().manual_seed(4)
    res = narrow_resnet(widths, routes=0, head=0, shortcut=("downsample.0", "downsample.1"))
    sd = {f"backbone.{k}": v for k, v in res.items() if not k.startswith("normalize.")}
    sd["pre_feature.0.weight"], sd["pre_feature.0.bias"] = torch.randn(pre, widths[-1], generator=g), torch.zeros(pre)
    _bn(sd, "pre_feature.1", pre, 0, g)
    sd["projection.0.weight"], sd["projection.0.bias"] = torch.randn(hidden, pre, generator=g), torch.zeros(hidden)
    _bn(sd, "projection.1", hidden, 0, g)
    sd["projection.3.weight"], sd["projection.3.bias"] = torch.randn(z, hidden, generator=g), torch.zeros(z)
    return {f"module.{k}": v for k, v in sd.items()}


def reference_file(fmt: str, tmp_path: Path) -> tuple[Path, dict]:
    """(file, the backbone's state dict in reference names) as each format's code saves it."""
    if fmt in ("empssl", "cf_amc_ssl"):
        sd = narrow_emp()
        obj = sd
        backbone = {k.removeprefix("module.backbone."): v for k, v in sd.items() if k.startswith("module.backbone.")}
    elif fmt == "dynacl":  # the official DynACL: query and key encoders in one file
        q, k = narrow_resnet(seed=1), narrow_resnet(seed=2)
        obj = {"epoch": 1000, "state_dict": {**{f"encoder_q.{n}": v for n, v in q.items()},
                                             **{f"encoder_k.{n}": v for n, v in k.items()}}}
        backbone = q
    elif fmt == "air":  # AIR saves from nn.DataParallel
        backbone = narrow_resnet(seed=3)
        obj = {"epoch": 1000, "state_dict": {f"module.{n}": v for n, v in backbone.items()}}
    elif fmt == "rcs":  # a ResNet-50 with bottleneck blocks: layer1.0 keeps a shortcut 8 -> 32
        backbone = narrow_resnet(bottleneck=True, seed=4)
        obj = backbone
    else:
        backbone = narrow_resnet(seed=5)
        obj = {"epoch": 1000, "state_dict": backbone}
    path = tmp_path / f"{fmt}.pt"
    torch.save(obj, path)
    return path, backbone


def imported(out: Path) -> tuple[dict, dict, object]:
    ckpt = latest_checkpoint(out)
    return load_file(str(ckpt / "model.safetensors")), read_meta(ckpt), load_run_recipe(out)


@pytest.mark.parametrize("fmt", list(SHIPPED))
def test_generated_recipe_tables_are_the_shipped_recipes(tmp_path: Path, fmt: str) -> None:
    path, _ = reference_file(fmt, tmp_path)
    result = run("import", str(path), "--format", fmt, "--out", str(tmp_path / "run"), "--quiet")
    assert result.exit_code == 0, result.output
    ours = load_run_recipe(tmp_path / "run").resolved
    shipped = resolve(load_raw(SHIPPED[fmt])).resolved
    method = dict(shipped["method"])
    if fmt in ("empssl", "cf_amc_ssl"):  # the heads' widths come from the file
        method.update(pre_dim=24, hidden_dim=20, z_dim=12)
    assert ours["method"] == method
    assert ours["attack"] == shipped["attack"] and ours["augment"] == shipped["augment"]
    assert ours["optimizer"] == shipped["optimizer"] and ours["run"]["seed"] == shipped["run"]["seed"]
    assert (ours["coreset"]["name"] == "rcs") == (fmt == "rcs")
