"""`rsslctl import`: released reference checkpoints → run directories.

Every checkpoint here is built by the test in the key layout the reference code saves (state dicts with the
reference key names and shapes, tiny widths where the architecture allows), written with torch.save.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_user_error, reference_bn, run
from safetensors.torch import load_file

from rsslctl.run.build import load_trained_method
from rsslctl.run.directory import load_run_recipe
from rsslctl.runtime.checkpoint import latest_checkpoint, read_meta

CPU = torch.device("cpu")
TINY = (8, 16, 16, 16)
BLOCKS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True)}


# -- reference layouts, written by the test ---------------------------------------------------------------------


def reference_resnet(depth: int = 18, widths: tuple = TINY, routes: int = 2, head: int = 3, classifier: int = 0,
                     stem: int = 3, downsample: str = "conv/bn", normalize: bool = True, seed: int = 0) -> dict:
    """State dict of the ACL-family ResNet (models/resnet_multi_bn.py of the four repositories) + proj_head."""
    g = torch.Generator().manual_seed(seed)
    blocks, bottleneck = BLOCKS[depth]
    expansion = 4 if bottleneck else 1
    sd: dict[str, torch.Tensor] = {}
    if normalize:
        sd["normalize.mean"] = torch.tensor([0.485, 0.456, 0.406])
        sd["normalize.std"] = torch.tensor([0.229, 0.224, 0.225])
    sd["conv1.weight"] = torch.randn(64, 3, stem, stem, generator=g) * 0.2
    sd.update(reference_bn("bn1", 64, routes, g))
    inplanes = 64
    conv_name, bn_name = (("downsample.conv", "downsample.bn") if downsample == "conv/bn"
                          else ("downsample.0", "downsample.1"))
    for stage, (n, planes) in enumerate(zip(blocks, widths), 1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            stride = 2 if b == 0 and stage > 1 else 1
            convs = ([(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)] if bottleneck
                     else [(planes, inplanes, 3), (planes, planes, 3)])
            for i, (o, c, k) in enumerate(convs, 1):
                sd[f"{p}.conv{i}.weight"] = torch.randn(o, c, k, k, generator=g) * (2 / (c * k * k)) ** 0.5
                sd.update(reference_bn(f"{p}.bn{i}", o, routes, g))
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                sd[f"{p}.{conv_name}.weight"] = torch.randn(planes * expansion, inplanes, 1, 1, generator=g) * 0.2
                sd.update(reference_bn(f"{p}.{bn_name}", planes * expansion, routes, g))
            inplanes = planes * expansion
    for n in range(1, head + 1):  # fc1 with bias, later layers without (proj_head)
        sd[f"fc.fc{n}.weight"] = torch.randn(inplanes, inplanes, generator=g) * 0.2
        if n == 1:
            sd["fc.fc1.bias"] = torch.randn(inplanes, generator=g) * 0.1
        sd.update(reference_bn(f"fc.bn{n}", inplanes, routes, g))
    if classifier:
        sd["fc.weight"] = torch.randn(classifier, inplanes, generator=g)
        sd["fc.bias"] = torch.zeros(classifier)
    return sd


def reference_emp(widths: tuple = TINY, pre: int = 32, hidden: int = 24, z: int = 16) -> dict:
    """EMP-SSL / CF-AMC-SSL encoder as saved from nn.DataParallel: module.backbone (torchvision), heads."""
    g = torch.Generator().manual_seed(5)
    sd = {f"backbone.{k}": v for k, v in reference_resnet(18, widths, 0, 0, 0, 3, "0/1", False).items()}
    feat = widths[-1]
    sd["pre_feature.0.weight"], sd["pre_feature.0.bias"] = (torch.randn(pre, feat, generator=g),
                                                            torch.randn(pre, generator=g))
    sd.update(reference_bn("pre_feature.1", pre, 0, g))
    sd["projection.0.weight"], sd["projection.0.bias"] = (torch.randn(hidden, pre, generator=g),
                                                          torch.randn(hidden, generator=g))
    sd.update(reference_bn("projection.1", hidden, 0, g))
    sd["projection.3.weight"], sd["projection.3.bias"] = (torch.randn(z, hidden, generator=g),
                                                          torch.randn(z, generator=g))
    return {f"module.{k}": v for k, v in sd.items()}


def expected_key(key: str, routes: int) -> str | None:
    """Where the test expects a ResNet-layout key in the rsslctl method state (None = dropped classifier)."""
    if key in ("fc.weight", "fc.bias"):
        return None
    if key.startswith("normalize."):
        return "encoder." + key.split(".")[1]
    for n, idx in ((1, 0), (2, 3), (3, 6)):
        key = key.replace(f"fc.fc{n}.", f"head.{idx}.").replace(f"fc.bn{n}.", f"head.{idx + 1}.")
    if not key.startswith("head."):
        key = "backbone." + key.replace("downsample.conv.", "downsample.0.").replace("downsample.bn.", "downsample.1.")
    if routes == 1:
        key = key.replace(".bn_list.0.", ".")
    return "encoder." + key


def save(tmp_path: Path, obj: object, name: str = "ref.pt", **kw) -> Path:
    path = tmp_path / name
    torch.save(obj, path, **kw)
    return path


def imported(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict, object]:
    ckpt = latest_checkpoint(run_dir)
    return load_file(str(ckpt / "model.safetensors")), read_meta(ckpt), load_run_recipe(run_dir)


def assert_all_landed(sd: dict, model: dict, routes: int, prefix: str = "") -> None:
    for key, value in sd.items():
        dest = expected_key(key, routes)
        if dest is not None:
            dest = dest.replace("encoder.", prefix, 1) if prefix else dest
            assert torch.equal(model[dest], value.reshape(model[dest].shape)), (key, dest)


# -- every format --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, depth, head, wrap", [
    ("acl", 18, 3, "state_dict"),
    ("air", 34, 2, "module"),       # AIR wraps ResNet-50 in DataParallel; twoLayerProj head
    ("rcs", 50, 3, "plain"),
    ("dynacl", 18, 3, "state_dict"),  # model_encoder_k.pt / model-zoo file: the key encoder alone
])
def test_resnet_formats_map_every_tensor(tmp_path: Path, fmt: str, depth: int, head: int, wrap: str) -> None:
    sd = reference_resnet(depth, head=head, seed=depth)
    obj = {"epoch": 1000, "state_dict": sd, "optim": {"state": {}, "param_groups": [{"lr": 0.0, "params": [0]}]}}
    if wrap == "module":
        obj = {"epoch": 1000, "state_dict": {f"module.{k}": v for k, v in sd.items()}}
    elif wrap == "plain":
        obj = sd
    path = save(tmp_path, obj)
    out = tmp_path / "run"
    result = run("import", str(path), "--format", fmt, "--out", str(out))
    assert result.exit_code == 0, result.output
    model, meta, recipe = imported(out)
    assert_all_landed(sd, model, 2)
    # spot checks in both naming schemes, written out
    assert torch.equal(model["encoder.backbone.layer2.0.downsample.0.weight"], sd["layer2.0.downsample.conv.weight"])
    assert torch.equal(model["encoder.backbone.layer2.0.downsample.1.bn_list.1.running_var"],
                       sd["layer2.0.downsample.bn.bn_list.1.running_var"])
    assert torch.equal(model["encoder.head.3.weight"], sd["fc.fc2.weight"])
    assert torch.equal(model["encoder.head.4.bn_list.0.bias"], sd["fc.bn2.bn_list.0.bias"])
    assert torch.equal(model["encoder.mean"].flatten(), sd["normalize.mean"])
    record = meta["import"]
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and record["format"] == fmt
    assert record["imported_from"] == str(path.resolve()) and meta["epoch"] == (0 if wrap == "plain" else 1000)
    assert meta["import"]["dataparallel_prefix"] == (wrap == "module")
    r = recipe.resolved
    assert r["backbone"]["model"] == f"resnet{depth}" and r["backbone"]["cifar_stem"]
    assert r["backbone"]["model_kwargs"] == {"channels": list(TINY)}
    assert r["encoder"]["dual_bn"] == "on" and r["encoder"]["head_layers"] == head
    assert r["method"]["name"] == {"acl": "acl", "air": "air", "rcs": "acl", "dynacl": "dynacl"}[fmt]
    assert (r["coreset"]["name"] == "rcs") == (fmt == "rcs")
    assert "imported" in result.stdout and fmt in result.stdout


def test_dynacl_query_and_key_encoders(tmp_path: Path) -> None:
    """Official DynACL model.pt (and model_encoder_k_<e>.pt): both encoders, under encoder_q. / encoder_k."""
    q, k = reference_resnet(seed=1), reference_resnet(seed=2)
    sd = {**{f"encoder_q.{n}": v for n, v in q.items()}, **{f"encoder_k.{n}": v for n, v in k.items()}}
    path = save(tmp_path, {"epoch": 25, "state_dict": sd})
    out = tmp_path / "run"
    result = run("import", str(path), "--out", str(out), "--quiet")  # auto: only dynacl writes this layout
    assert result.exit_code == 0, result.output
    model, meta, recipe = imported(out)
    assert meta["import"]["format"] == "dynacl" and recipe.resolved["method"]["momentum_encoder"]
    assert_all_landed(q, model, 2)
    assert_all_landed(k, model, 2, prefix="key_encoder.")
    method, _, _ = load_trained_method(out, recipe, CPU, "test")
    assert method.eval_encoder() is method.key_encoder  # the official code evaluates the key encoder
    assert torch.equal(method.eval_encoder().backbone.conv1.weight, k["conv1.weight"])


def test_single_bn_and_fine_tuned_files(tmp_path: Path) -> None:
    # ACL without --ACL_DS: one BN route, stored as bn_list.0 -> imported as single BN
    sd = reference_resnet(routes=1)
    result = run("import", str(save(tmp_path, {"state_dict": sd})), "--format", "acl", "--out", str(tmp_path / "a"))
    assert result.exit_code == 0, result.output
    model, meta, recipe = imported(tmp_path / "a")
    assert recipe.resolved["encoder"]["dual_bn"] == "off" and not any(".bn_list." in k for k in model)
    assert_all_landed(sd, model, 1)
    assert torch.equal(model["encoder.backbone.layer1.0.bn2.running_mean"], sd["layer1.0.bn2.bn_list.0.running_mean"])

    # DynACL++ after LPAFT on STL-10 (ImageNet stem): single-BN torchvision names and a classifier, no head
    sd = reference_resnet(routes=0, head=0, classifier=10, downsample="0/1", stem=7)
    path = save(tmp_path, {"epoch": 25, "state_dict": sd, "optim": {}}, "lpaft.pt")
    result = run("import", str(path), "--format", "dynacl", "--out", str(tmp_path / "b"), "--quiet")
    assert result.exit_code == 0, result.output
    model, meta, recipe = imported(tmp_path / "b")
    assert recipe.resolved["encoder"]["head_layers"] == 0 and recipe.resolved["encoder"]["dual_bn"] == "off"
    assert (not recipe.resolved["backbone"]["cifar_stem"] and recipe.resolved["data"]["name"] == "stl10"
            and recipe.data.image_size == 96)
    assert torch.equal(model["encoder.backbone.conv1.weight"], sd["conv1.weight"])
    assert (meta["import"]["dropped"] == ["fc.weight", "fc.bias"]
            and not any(k.startswith("encoder.head") for k in model))
    assert torch.equal(model["encoder.backbone.layer2.0.downsample.1.weight"], sd["layer2.0.downsample.1.weight"])

    # DynACL++ dual-BN (LPAFT_AFF model.pt) in the model-zoo container key
    sd = reference_resnet(routes=2, head=0, classifier=10)
    path = save(tmp_path, {"state_dict_dual": sd}, "zoo.pt")
    assert run("import", str(path), "--format", "dynacl", "--out", str(tmp_path / "c"), "--quiet").exit_code == 0
    model, meta, recipe = imported(tmp_path / "c")
    assert meta["import"]["container"] == "state_dict_dual" and recipe.resolved["encoder"]["dual_bn"] == "on"
    assert_all_landed(sd, model, 2)


def test_key_names_of_other_resnet_codebases() -> None:
    from rsslctl_plugins.commands.reference_checkpoints import map_resnet_key
    assert (map_resnet_key("layer2.0.shortcut.1.bn_list.1.weight", 2)
            == "backbone.layer2.0.downsample.1.bn_list.1.weight")
    assert map_resnet_key("bn1.bn_list.weight", 0) == "backbone.bn1.weight"  # BN built without route names
    assert map_resnet_key("fc.bn3.bn_list.0.bias", 1) == "head.7.bias"


@pytest.mark.parametrize("fmt, mean, method", [("empssl", 0.5, "empssl"), ("cf_amc_ssl", 0.0, "empssl_adv")])
def test_emp_formats(tmp_path: Path, fmt: str, mean: float, method: str) -> None:
    sd = reference_emp()
    path = save(tmp_path, sd, "30.pt")  # saved as net.state_dict() of the DataParallel model, no container
    out = tmp_path / "run"
    result = run("import", str(path), "--format", fmt, "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    model, meta, recipe = imported(out)
    for key, value in sd.items():
        key = key.removeprefix("module.")
        dest = key.replace("backbone.", "encoder.backbone.").replace("projection.", "projector.")
        assert torch.equal(model[dest], value), key
    r = recipe.resolved
    assert (r["method"]["name"] == method
            and (r["method"]["pre_dim"], r["method"]["hidden_dim"], r["method"]["z_dim"]) == (32, 24, 16))
    assert r["encoder"]["head_layers"] == 0 and r["encoder"]["mean"] == [mean] * 3
    assert torch.all(model["encoder.mean"] == mean) and meta["import"]["dataparallel_prefix"]


# -- the mapping computes what the reference model computes --------------------------------------------------------


def reference_forward(sd: dict, x: torch.Tensor, route: int, depth: int, head: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and projection of the reference ResNet + proj_head in eval mode, written from their definitions."""
    def bn(p: str, h: torch.Tensor) -> torch.Tensor:
        k = f"{p}.bn_list.{route}."
        return F.batch_norm(h, sd[k + "running_mean"], sd[k + "running_var"], sd[k + "weight"], sd[k + "bias"],
                            False, 0.0, 1e-5)
    blocks, bottleneck = BLOCKS[depth]
    h = (x - sd["normalize.mean"].view(1, 3, 1, 1)) / sd["normalize.std"].view(1, 3, 1, 1)
    h = F.relu(bn("bn1", F.conv2d(h, sd["conv1.weight"], padding=1)))
    for stage, n in enumerate(blocks, 1):
        for b in range(n):
            p, stride = f"layer{stage}.{b}", (2 if b == 0 and stage > 1 else 1)
            if bottleneck:
                o = F.relu(bn(f"{p}.bn1", F.conv2d(h, sd[f"{p}.conv1.weight"])))
                o = F.relu(bn(f"{p}.bn2", F.conv2d(o, sd[f"{p}.conv2.weight"], stride=stride, padding=1)))
                o = bn(f"{p}.bn3", F.conv2d(o, sd[f"{p}.conv3.weight"]))
            else:
                o = F.relu(bn(f"{p}.bn1", F.conv2d(h, sd[f"{p}.conv1.weight"], stride=stride, padding=1)))
                o = bn(f"{p}.bn2", F.conv2d(o, sd[f"{p}.conv2.weight"], padding=1))
            if f"{p}.downsample.conv.weight" in sd:
                h = bn(f"{p}.downsample.bn", F.conv2d(h, sd[f"{p}.downsample.conv.weight"], stride=stride))
            h = F.relu(o + h)
    feat = z = h.mean((2, 3))
    for i in range(1, head + 1):
        z = bn(f"fc.bn{i}", F.linear(z, sd[f"fc.fc{i}.weight"], sd.get(f"fc.fc{i}.bias")))
        z = F.relu(z) if i < head else z
    return feat, z


@pytest.mark.parametrize("depth", [18, 50])
def test_imported_model_computes_the_reference_forward(tmp_path: Path, depth: int) -> None:
    sd = reference_resnet(depth, seed=11)
    out = tmp_path / "run"
    assert run("import", str(save(tmp_path, {"state_dict": sd})), "--format", "acl", "--out", str(out)).exit_code == 0
    recipe = load_run_recipe(out)
    encoder = load_trained_method(out, recipe, CPU, "test")[0].encoder.eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for route, name in enumerate(("normal", "pgd")):
            feat, z = reference_forward(sd, x, route, depth, 3)
            ours = encoder.features(x, name)
            # fp32 through 50 layers: the summation order (thread count) moves the last bits, relative to the scale
            assert torch.allclose(ours, feat, rtol=0, atol=2e-6 * feat.abs().max()), (ours - feat).abs().max()
            assert torch.allclose(encoder(x, name), z, rtol=0, atol=2e-6 * z.abs().max())


# -- refusals: one line, exit code 2, nothing written ---------------------------------------------------------------


def test_auto_detects_only_unambiguous_layouts(tmp_path: Path) -> None:
    path = save(tmp_path, {"state_dict": reference_resnet()})
    assert_user_error(run("import", str(path), "--out", str(tmp_path / "r")), "ambiguous", "acl, air, dynacl, rcs",
                      "--format")
    path = save(tmp_path, reference_emp(), "emp.pt")
    assert_user_error(run("import", str(path), "--out", str(tmp_path / "r")), "ambiguous", "empssl, cf_amc_ssl")
    assert_user_error(run("import", str(path), "--format", "acl", "--out", str(tmp_path / "r")),
                      "EMP-SSL", "--format acl does not use", "empssl or cf_amc_ssl")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("zipped", [True, False])
def test_unsafe_pickle_is_refused_and_never_executed(tmp_path: Path, zipped: bool) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = save(tmp_path, {"state_dict": reference_resnet(), "hook": Payload()}, "evil.pt",
                _use_new_zipfile_serialization=zipped)
    result = run("import", str(path), "--format", "acl", "--out", str(tmp_path / "r"))
    assert_user_error(result, "refusing to load", "system", "unrestricted unpickler")
    assert not marker.exists() and not (tmp_path / "r").exists()
    raw = tmp_path / "raw.pt"  # a bare pickle, not written by torch.save
    raw.write_bytes(pickle.dumps({"state_dict": Payload()}))
    assert_user_error(run("import", str(raw), "--format", "acl", "--out", str(tmp_path / "r")), "weights-only")
    assert not marker.exists()

    path = save(tmp_path, {"state_dict": reference_resnet(), "args": argparse_namespace()}, "args.pt")
    assert_user_error(run("import", str(path), "--format", "acl", "--out", str(tmp_path / "r")),
                      "refusing to load", "argparse.Namespace")


def argparse_namespace() -> object:
    import argparse
    return argparse.Namespace(lr=5.0)


def test_unmappable_key_is_named(tmp_path: Path) -> None:
    sd = reference_resnet()
    sd["layer1.0.se.fc.weight"] = torch.zeros(2, 8)
    result = run("import", str(save(tmp_path, {"state_dict": sd})), "--format", "acl", "--out", str(tmp_path / "r"))
    assert_user_error(result, "'layer1.0.se.fc.weight' does not map")
    emp = reference_emp()
    emp["module.predictor.weight"] = torch.zeros(2)
    result = run("import", str(save(tmp_path, emp, "e.pt")), "--format", "empssl", "--out", str(tmp_path / "r"))
    assert_user_error(result, "'module.predictor.weight' does not map")
    sd = reference_resnet()
    del sd["layer3.1.bn2.bn_list.1.running_var"]
    result = run("import", str(save(tmp_path, sd, "x.pt")), "--format", "rcs", "--out", str(tmp_path / "r"))
    assert_user_error(result, "no weights for 'encoder.backbone.layer3.1.bn2.bn_list.1.running_var'")
    assert not (tmp_path / "r").exists()


def test_bad_inputs_and_output_directories(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert_user_error(run("import", str(text), "--out", str(tmp_path / "r")), "not a readable PyTorch checkpoint")
    assert_user_error(run("import", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "r")), "not found")
    assert_user_error(run("import", str(save(tmp_path, [1, 2], "list.pt")), "--out", str(tmp_path / "r")),
                      "not a state dict")
    # files written by PyTorch < 1.6 (legacy, non-zip format) import too
    path = save(tmp_path, {"state_dict": reference_resnet()}, "legacy.pt", _use_new_zipfile_serialization=False)
    out = tmp_path / "run"
    assert run("import", str(path), "--format", "acl", "--out", str(out), "--quiet").exit_code == 0
    assert_user_error(run("import", str(path), "--format", "acl", "--out", str(out)), "already exists", "--force")
    first = latest_checkpoint(out)
    assert run("import", str(path), "--format", "air", "--out", str(out), "--force", "--quiet").exit_code == 0
    assert load_run_recipe(out).resolved["method"]["name"] == "air" and latest_checkpoint(out) == first
    # never write into (or, with --force, delete) the input's own directory
    assert_user_error(run("import", str(path), "--format", "acl", "--out", str(tmp_path), "--force"),
                      "holds the input file")
    assert_user_error(run("import", str(path), "--format", "acl", "--out", str(path)), "holds the input file")
    assert path.is_file()
    assert_user_error(run("import", str(path), "--format", "acl", "--out", str(tmp_path / "r2"),
                          "--set", "encoder.head_layers=2"), "does not map")


# -- end to end: evaluate, fine-tune and export an imported ACL checkpoint ---------------------------------------


def test_imported_acl_checkpoint_evaluates_finetunes_and_exports(tmp_path: Path) -> None:
    path = save(tmp_path, {"epoch": 1000, "state_dict": reference_resnet(widths=(8, 16, 16, 16), head=2, seed=3)})
    out = tmp_path / "acl_run"
    result = run("import", str(path), "--format", "acl", "--out", str(out), "--set", "data.name=digits",
                 "--set", "data.image_size=16", "--set", "engine.device=cpu")
    assert result.exit_code == 0, result.output
    fast = ["--set", "evaluation.epochs=5", "--set", "evaluation.limit=32", "--set", "evaluation.steps=1"]
    result = run("evaluate", str(out), "--json", *fast)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["epoch"] == 1000 and report["route"] == "pgd" and report["test_images"] == 32
    common = ["--epochs", "1", "--batch-size", "32", "--train-steps", "1", "--pgd-steps", "2", "--test-limit", "32",
              "--eps-curve", "0,8", "--set", "data.limit=64", "--quiet", "--json"]
    result = run("finetune", str(out), "--mode", "SLF", *common)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["modes"]["SLF"]["test_images"] == 32
    result = run("finetune", str(out), "--mode", "AFF", *common)
    assert result.exit_code == 0, result.output
    aff = json.loads((out / "finetune" / "AFF" / "config.json").read_text())
    assert aff["dual_bn_trained"] and aff["config"]["pretraining"] == "ACL"
    assert run("export", str(out)).exit_code == 0 and (out / "encoder.safetensors").is_file()


# -- odd tensors: one line naming the entry, exit code 2, nothing written -------------------------------------------


def _odd(sd: dict, case: str) -> tuple[object, str]:
    """``sd`` with one entry made unusable in the way ``case`` says, and the entry the refusal must name."""
    key = "layer1.0.conv1.weight"
    w = sd[key]
    if case == "int key":
        return {"state_dict": {0: torch.zeros(3), **sd}}, "entry 0"
    if case == "nan normalisation":
        return {"state_dict": {**sd, "normalize.mean": torch.full((3,), float("nan"))}}, "'normalize.mean'"
    if case == "zero std":
        return {"state_dict": {**sd, "normalize.std": torch.zeros(3)}}, "'normalize.std'"
    if case == "sparse":
        return {"state_dict": {**sd, key: w.to_sparse()}}, f"'{key}'"
    if case == "meta":
        return {"state_dict": {**sd, key: torch.empty(w.shape, device="meta")}}, f"'{key}'"
    if case == "complex":
        return {"state_dict": {**sd, key: w.to(torch.complex64)}}, f"'{key}'"
    raise AssertionError(case)


@pytest.mark.parametrize("case, why", [("int key", "keyed by a int, not a name"), ("nan normalisation", "NaN"),
                                       ("zero std", "must be > 0"), ("sparse", "sparse"), ("meta", "meta tensor"),
                                       ("complex", "complex")])
def test_odd_tensors_are_refused_naming_the_entry(tmp_path: Path, case: str, why: str) -> None:
    obj, entry = _odd(reference_resnet(), case)
    path = save(tmp_path, obj, "odd.pt")
    out = tmp_path / "r"
    result = run("import", str(path), "--format", "acl", "--out", str(out))
    assert_user_error(result, str(path), entry, why)
    assert "internal error" not in result.stderr and "Warning" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".r.import-*"))
