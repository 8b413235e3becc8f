"""`rsslctl import` of narrowed reference checkpoints, and the generated recipes.

The files are written here in the layout the authors' code saves, with the network their code builds when narrowed:
the stem as wide as the first stage (``inplanes = widths[0]``), so a basic-block ResNet has no shortcut in layer1.0.
That is the CIFAR ResNet rsslctl's narrow recipes build with ``backbone.stem_width``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_user_error, evaluate_finetune_export, reference_bn, run
from safetensors.torch import load_file

from rsslctl.run.build import load_trained_method
from rsslctl.run.directory import load_run_recipe
from rsslctl.run.recipe import load_raw, resolve
from rsslctl.runtime.checkpoint import latest_checkpoint, read_meta

NARROW = (8, 16, 16, 16)
SHIPPED = {"acl": "acl", "dynacl": "dynacl", "air": "dynacl_air", "rcs": "acl", "empssl": "empssl",
           "cf_amc_ssl": "cf_amc_ssl"}


def narrow_resnet(widths: tuple = NARROW, bottleneck: bool = False, routes: int = 2, head: int = 3,
                  shortcut: tuple = ("downsample.conv", "downsample.bn"), seed: int = 0, stem: int = 0) -> dict:
    """A ResNet-18 (or ResNet-50) state dict as the reference code saves it, narrowed: ``inplanes`` starts at the
    first stage width (or ``stem``), conv1 is 3×3, a shortcut exists where stride ≠ 1 or widths differ."""
    g = torch.Generator().manual_seed(seed)
    blocks, expansion = ((3, 4, 6, 3), 4) if bottleneck else ((2, 2, 2, 2), 1)
    inplanes = stem or widths[0]
    sd: dict[str, torch.Tensor] = {"normalize.mean": torch.tensor([0.4914, 0.4822, 0.4465]),
                                   "normalize.std": torch.tensor([0.2470, 0.2435, 0.2616])}
    sd["conv1.weight"] = torch.randn(inplanes, 3, 3, 3, generator=g) * 0.3
    sd.update(reference_bn("bn1", inplanes, routes, g, tracked=3))
    for stage, (n, planes) in enumerate(zip(blocks, widths), 1):
        for b in range(n):
            p, stride = f"layer{stage}.{b}", (2 if b == 0 and stage > 1 else 1)
            convs = ([(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)] if bottleneck
                     else [(planes, inplanes, 3), (planes, planes, 3)])
            for i, (o, c, k) in enumerate(convs, 1):
                sd[f"{p}.conv{i}.weight"] = torch.randn(o, c, k, k, generator=g) * (2 / (c * k * k)) ** 0.5
                sd.update(reference_bn(f"{p}.bn{i}", o, routes, g, tracked=3))
            if stride != 1 or inplanes != planes * expansion:
                sd[f"{p}.{shortcut[0]}.weight"] = torch.randn(planes * expansion, inplanes, 1, 1, generator=g) * 0.3
                sd.update(reference_bn(f"{p}.{shortcut[1]}", planes * expansion, routes, g, tracked=3))
            inplanes = planes * expansion
    for n in range(1, head + 1):  # proj_head: fc1 with bias, the others without
        sd[f"fc.fc{n}.weight"] = torch.randn(inplanes, inplanes, generator=g) * 0.3
        if n == 1:
            sd["fc.fc1.bias"] = torch.randn(inplanes, generator=g) * 0.1
        sd.update(reference_bn(f"fc.bn{n}", inplanes, routes, g, tracked=3))
    return sd


def narrow_emp(widths: tuple = NARROW, pre: int = 24, hidden: int = 20, z: int = 12) -> dict:
    """EMP-SSL / CF-AMC-SSL: a (narrowed) torchvision ResNet-18 under backbone., the two heads, saved from
    nn.DataParallel."""
    g = torch.Generator().manual_seed(4)
    res = narrow_resnet(widths, routes=0, head=0, shortcut=("downsample.0", "downsample.1"))
    sd = {f"backbone.{k}": v for k, v in res.items() if not k.startswith("normalize.")}
    sd["pre_feature.0.weight"], sd["pre_feature.0.bias"] = torch.randn(pre, widths[-1], generator=g), torch.zeros(pre)
    sd.update(reference_bn("pre_feature.1", pre, 0, g, tracked=3))
    sd["projection.0.weight"], sd["projection.0.bias"] = torch.randn(hidden, pre, generator=g), torch.zeros(hidden)
    sd.update(reference_bn("projection.1", hidden, 0, g, tracked=3))
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


def expected_key(key: str) -> str:
    """Where a reference key lands in the method state (written out here, independently of the importer)."""
    if key.startswith("module."):
        key = key[len("module."):]
    for ref, ours in (("encoder_q.", "encoder."), ("encoder_k.", "key_encoder.")):
        if key.startswith(ref):
            return ours + expected_key(key[len(ref):])[len("encoder."):]
    if key.startswith(("pre_feature.", "projection.")):
        return key.replace("projection.", "projector.")
    key = key.removeprefix("backbone.")
    if key.startswith("normalize."):
        return "encoder." + key.split(".")[1]
    for n, idx in ((1, 0), (2, 3), (3, 6)):
        key = key.replace(f"fc.fc{n}.", f"head.{idx}.").replace(f"fc.bn{n}.", f"head.{idx + 1}.")
    if not key.startswith("head."):
        key = "backbone." + key.replace("downsample.conv.", "downsample.0.").replace("downsample.bn.", "downsample.1.")
    return "encoder." + key


@pytest.mark.parametrize("fmt", list(SHIPPED))
def test_every_layout_imports_its_narrowed_network(tmp_path: Path, fmt: str) -> None:
    path, backbone = reference_file(fmt, tmp_path)
    out = tmp_path / "run"
    result = run("import", str(path), "--format", fmt, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "CIFAR stem, 8 wide" in result.stdout
    model, meta, recipe = imported(out)
    file = torch.load(path, weights_only=True)
    file = file.get("state_dict", file)
    for key, value in file.items():
        dest = expected_key(key)
        assert torch.equal(model[dest], value.reshape(model[dest].shape)), (key, dest)
    r = recipe.resolved["backbone"]
    assert r["stem_width"] == 8 and r["cifar_stem"] and r["model_kwargs"] == {"channels": list(NARROW)}
    assert r["model"] == ("resnet50" if fmt == "rcs" else "resnet18")
    net = load_trained_method(out, recipe, torch.device("cpu"), "test")[0].encoder.backbone
    assert net.conv1.out_channels == 8 and net.layer1[0].conv1.in_channels == 8
    # the authors' narrowed basic block has no layer1.0 shortcut (8 -> 8); their bottleneck has one (8 -> 32)
    assert (net.layer1[0].downsample is not None) == (fmt == "rcs")
    assert meta["import"]["backbone"]["stem_width"] == 8


def test_a_stem_of_another_width_and_the_imagenet_stem(tmp_path: Path) -> None:
    sd = narrow_resnet(stem=12)  # stem 12 in front of 8-wide stages: the reference code adds a 12 -> 8 shortcut
    assert "layer1.0.downsample.conv.weight" in sd
    path = tmp_path / "s.pt"
    torch.save({"state_dict": sd}, path)
    assert run("import", str(path), "--format", "acl", "--out", str(tmp_path / "r"), "--quiet").exit_code == 0
    model, _, recipe = imported(tmp_path / "r")
    assert recipe.resolved["backbone"]["stem_width"] == 12
    assert torch.equal(model["encoder.backbone.layer1.0.downsample.0.weight"], sd["layer1.0.downsample.conv.weight"])
    sd = narrow_resnet()
    sd["conv1.weight"] = torch.zeros(8, 3, 7, 7)  # a narrowed 7×7 ImageNet stem: rsslctl cannot build it
    torch.save({"state_dict": sd}, path)
    assert_user_error(run("import", str(path), "--format", "acl", "--out", str(tmp_path / "x")),
                      "7×7 ImageNet stem 8 channels wide", "backbone.stem_width")
    assert not (tmp_path / "x").exists()


def reference_forward(sd: dict, x: torch.Tensor, route: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode features and projection of the reference narrowed ResNet-18 + proj_head, from their definitions."""
    def bn(p: str, h: torch.Tensor) -> torch.Tensor:
        k = f"{p}.bn_list.{route}."
        return F.batch_norm(h, sd[k + "running_mean"], sd[k + "running_var"], sd[k + "weight"], sd[k + "bias"],
                            False, 0.0, 1e-5)
    h = (x - sd["normalize.mean"].view(1, 3, 1, 1)) / sd["normalize.std"].view(1, 3, 1, 1)
    h = F.relu(bn("bn1", F.conv2d(h, sd["conv1.weight"], padding=1)))
    for stage in range(1, 5):
        for b in range(2):
            p, stride = f"layer{stage}.{b}", (2 if b == 0 and stage > 1 else 1)
            o = F.relu(bn(f"{p}.bn1", F.conv2d(h, sd[f"{p}.conv1.weight"], stride=stride, padding=1)))
            o = bn(f"{p}.bn2", F.conv2d(o, sd[f"{p}.conv2.weight"], padding=1))
            if f"{p}.downsample.conv.weight" in sd:
                h = bn(f"{p}.downsample.bn", F.conv2d(h, sd[f"{p}.downsample.conv.weight"], stride=stride))
            h = F.relu(o + h)
    feat = z = h.mean((2, 3))
    for i in range(1, 4):
        z = bn(f"fc.bn{i}", F.linear(z, sd[f"fc.fc{i}.weight"], sd.get(f"fc.fc{i}.bias")))
        z = F.relu(z) if i < 3 else z
    return feat, z


def test_narrowed_acl_file_computes_the_reference_forward_and_runs_end_to_end(tmp_path: Path) -> None:
    path, sd = reference_file("acl", tmp_path)
    out = tmp_path / "acl_run"
    result = run("import", str(path), "--format", "acl", "--out", str(out), "--set", "data.name=digits",
                 "--set", "data.image_size=16", "--set", "engine.device=cpu", "--quiet")
    assert result.exit_code == 0, result.output
    encoder = load_trained_method(out, load_run_recipe(out), torch.device("cpu"), "test")[0].encoder.eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for route, name in enumerate(("normal", "pgd")):
            feat, z = reference_forward(sd, x, route)
            assert torch.allclose(encoder.features(x, name), feat, rtol=0, atol=2e-6 * feat.abs().max())
            assert torch.allclose(encoder(x, name), z, rtol=0, atol=2e-6 * z.abs().max())
    exported = evaluate_finetune_export(out)
    assert exported["conv1.weight"].shape == (8, 3, 3, 3) and torch.equal(exported["conv1.weight"], sd["conv1.weight"])
