"""Hostile and careless input: a property-based fuzz of recipe values and overrides, plus the malformed files and
absurd values that used to end in a traceback. Every case ends in a valid run or one line and exit code 2, and an
error never leaves a directory behind. Nothing here trains: `pretrain` runs with the Trainer replaced by a stub."""
from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rsslctl.cli import main
from rsslctl.cli import pretrain as pretrain_module

#: (table, key) pairs the fuzz test overrides: every core key a careless user could mistype, plus plugin keys
KEYS = [("run", "name"), ("run", "seed"), ("data", "image_size"), ("data", "limit"), ("data", "train_split"),
        ("augment", "strength"), ("augment", "crop_scale"), ("augment", "jitter"), ("augment", "flip_p"),
        ("backbone", "model"), ("backbone", "cifar_stem"), ("backbone", "model_kwargs"), ("backbone", "weights"),
        ("encoder", "head_layers"), ("encoder", "head_dim"), ("encoder", "mean"), ("encoder", "std"),
        ("method", "temperature"), ("method", "variant"), ("attack", "eps"), ("attack", "step_size"),
        ("attack", "steps"), ("attack", "norm"), ("optimizer", "name"), ("optimizer", "lr"),
        ("optimizer", "momentum"), ("optimizer", "betas"), ("optimizer", "weight_decay"), ("schedule", "epochs"),
        ("schedule", "batch_size"), ("schedule", "warmup_epochs"), ("schedule", "min_lr"), ("schedule", "kind"),
        ("engine", "grad_clip"), ("engine", "keep_checkpoints"), ("engine", "log_every"), ("engine", "threads"),
        ("engine", "precision"), ("evaluation", "eps"), ("evaluation", "steps"), ("evaluation", "epochs"),
        ("coreset", "fraction"), ("coreset", "every"), ("sheduler", "epochs"), ("method", "temprature")]

SPECIAL = ["nan", "inf", "-inf", "1e999", "-1e999", "1e30", "8/255", "8/0", "0/0", "1/3", "", ".", "..",
           "../escaped", "a/b", "\x00", "x" * 300, "resnet18", "linf", "sgd", "cosine", "bf16", "none", "0", "-1",
           "1" * 22, "{checkpoint_path = 'x.pth'}", "[0, 0, 0]", "[0, 0, 0, 0]", "[[[[[[[[[[1]]]]]]]]]]"]

scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(2**80), max_value=2**80),
    st.integers(min_value=-3, max_value=70), st.booleans(), st.text(max_size=12), st.sampled_from(SPECIAL))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.sampled_from(["channels", "checkpoint_path", "depth", "x"]), inner,
                                        max_size=3),
                      max_leaves=8)


plausible = st.one_of(st.integers(min_value=0, max_value=64), st.floats(min_value=0, max_value=1), st.booleans(),
                      st.sampled_from(["resnet18", "linf", "sgd", "cosine", "bf16", "none", "8/255", "run2"]))


#: values each key accepts, so that a good share of the fuzzed recipes is valid and reaches the run directory
VALID = {"run.name": st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,20}", fullmatch=True),
         "run.seed": st.integers(0, 2**32 - 1), "data.image_size": st.integers(8, 64),
         "data.limit": st.integers(0, 500), "augment.strength": st.floats(0.01, 1),
         "augment.flip_p": st.floats(0, 1), "encoder.head_layers": st.integers(0, 8),
         "encoder.std": st.lists(st.floats(0.01, 10), min_size=3, max_size=3),
         "attack.eps": st.floats(0, 1), "attack.steps": st.integers(1, 20), "optimizer.lr": st.floats(0, 10),
         "optimizer.momentum": st.floats(0, 1), "schedule.epochs": st.integers(1, 1000),
         "schedule.batch_size": st.integers(2, 64), "schedule.min_lr": st.floats(0, 1e-3),
         "engine.grad_clip": st.floats(0, 100), "engine.keep_checkpoints": st.integers(1, 10),
         "engine.log_every": st.integers(1, 100), "evaluation.eps": st.floats(0, 1),
         "evaluation.steps": st.integers(1, 50)}


def toml_value(v: object) -> str:
    """A value as TOML text (what a user types after `--set key=`)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"  # type: ignore[union-attr]


override = st.one_of(
    st.tuples(st.sampled_from(KEYS), values).map(lambda kv: f"{kv[0][0]}.{kv[0][1]}={toml_value(kv[1])}"),
    st.tuples(st.sampled_from(KEYS), st.sampled_from(SPECIAL)).map(lambda kv: f"{kv[0][0]}.{kv[0][1]}={kv[1]}"),
    st.text(max_size=20),  # raw garbage: no '=', unknown tables, unparseable TOML
    *[st.tuples(st.sampled_from(KEYS), plausible).map(lambda kv: f"{kv[0][0]}.{kv[0][1]}={toml_value(kv[1])}")] * 2,
    *[st.sampled_from(sorted(VALID)).flatmap(lambda k: VALID[k].map(lambda v: f"{k}={toml_value(v)}"))] * 4)

FUZZ_EXAMPLES = 300


class _StubTrainer:
    """Stands in for the Trainer: the fuzz test checks validation and directory handling, not training."""

    def __init__(self, recipe, run_dir, quiet=False) -> None:
        self.run_dir = run_dir

    def fit(self, resume: bool = False, from_checkpoint=None) -> dict:
        return {}


def assert_one_line_error(result) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in result.output, err


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(overrides=st.lists(override, min_size=1, max_size=3))
def test_fuzzed_overrides_give_a_valid_run_or_one_line(overrides: list[str], tiny_recipe: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrain_module, "Trainer", _StubTrainer)
    out = tiny_recipe.parent / "runs"
    args = ["pretrain", str(tiny_recipe), "--quiet", "--force"]
    for o in overrides:
        if o.startswith(("run.output_dir", "data.root")):
            continue
        args += ["--set", o]
    args += ["--set", f"run.output_dir={json.dumps(str(out))}"]
    before = set(out.rglob("*")) if out.exists() else set()
    result = CliRunner().invoke(main, args)
    event("valid run" if result.exit_code == 0 else "one-line error")
    if result.exit_code == 0:
        assert out.is_dir() and any(p.name == ".rsslctl-run" for p in out.rglob(".rsslctl-run"))
    else:
        assert_one_line_error(result)
        assert (set(out.rglob("*")) if out.exists() else set()) == before  # nothing created on error


# -- recipe files a careless user passes ----------------------------------------------------------------------------
@pytest.mark.parametrize("content, fragment", [
    (b"\x00\x01\xff\xfe binary", "not a UTF-8 text file"),
    ("[run]\nname = 'x'\n".encode("utf-16"), "not a UTF-8 text file"),
    (b"x = " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b"[method\nname='acl'", "invalid TOML"),
    (b"run = 3\n", "must be a table"),
])
def test_malformed_recipe_files_give_one_line(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "r.toml"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["recipe", "show", str(path)])
    assert_one_line_error(result)
    assert fragment in result.stderr


@pytest.mark.parametrize("override, fragment", [
    ("schedule.epochs=1e30", "allowed range"),
    ('attack.eps="1e999"', "not a finite number"),
    ("attack.eps=nan", "not a finite number"),
    ("optimizer.momentum=nan", "allowed range [0, 1]"),
    ("optimizer.lr=inf", "optimizer.lr"),
    ("engine.grad_clip=nan", "engine.grad_clip"),
    ("evaluation.eps=nan", "evaluation.eps"),
    ("schedule.min_lr=nan", "schedule.min_lr"),
    ("schedule.warmup_epochs=inf", "schedule.warmup_epochs"),
    ("encoder.std=[0,0,0]", "encoder.std"),
    ("data.image_size=100000", "allowed range [8, 1024]"),
    ("run.seed=1234567890123456789012", "run.seed"),
    ("run.name='.'", "not a valid run name"),
    ("run.name='../escaped'", "not a valid run name"),
    ("run.name='" + "x" * 300 + "'", "not a valid run name"),
    ('run.name="a\\u0000b"', "not a valid run name"),
    ("backbone.model_kwargs={checkpoint_path='x.pth'}", "refused"),
    ("backbone.model_kwargs={pretrained=true}", "refused"),
    ("backbone.model_kwargs={channels=[0,0,0,0]}", "without weights"),
])
def test_absurd_values_are_refused_before_any_directory(tiny_recipe: Path, override: str, fragment: str) -> None:
    with warnings.catch_warnings(record=True) as shown:  # what Python's default filters would print beside the line
        warnings.simplefilter("always")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=hidden)
        result = CliRunner().invoke(main, ["pretrain", str(tiny_recipe), "--quiet", "--set", override])
    assert not shown, [str(w.message) for w in shown]
    assert_one_line_error(result)
    assert fragment in result.stderr, result.stderr
    assert not (tiny_recipe.parent / "runs").exists()
    assert not (tiny_recipe.parent / "escaped").exists()


def test_unwritable_output_dir_is_one_line(tiny_recipe: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pretrain_module, "Trainer", _StubTrainer)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(main, ["pretrain", str(tiny_recipe), "--quiet", "--set",
                                       f"run.output_dir={json.dumps(str(blocker / 'sub'))}"])
    assert_one_line_error(result)
    assert "a-file" in result.stderr


# -- pickle, symlinks, bombs, hostile dataset files -----------------------------------------------------------------
def test_no_pickle_through_safetensors_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from safetensors.torch import save_file

    def no_pickle(*a, **k):
        raise AssertionError("torch.load reached")
    monkeypatch.setattr(torch, "load", no_pickle)
    weights = tmp_path / "w.safetensors"
    info = {"backbone": {"model": "resnet18", "model_kwargs": {"checkpoint_path": str(tmp_path / "evil.pth")}}}
    save_file({"x": torch.zeros(1)}, str(weights), metadata={"rsslctl": json.dumps(info)})
    result = CliRunner().invoke(main, ["finetune", "--weights", str(weights), "--out", str(tmp_path / "o"),
                                       "--epochs", "1", "--no-evaluate"])
    assert_one_line_error(result)
    assert "refused" in result.stderr


def _png(path: Path, size: int = 40) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (200, 10, 10)).save(path)


def _image_folder(root: Path, *extra: str) -> list[str]:
    return ["--set=data.name='image_folder'", f"--set=data.root={json.dumps(str(root))}",
            "--set=data.path='set'", "--set=data.limit=0", "--set=data.image_size=16", *extra]


def test_image_folder_does_not_follow_symlinks_out_of_its_root(tmp_path: Path) -> None:
    from rsslctl.run.build import load_split
    from rsslctl.run.recipe import resolve
    root = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(2):
            _png(root / "set" / "train" / c / f"{i}.png")
    outside = tmp_path / "secret"
    for i in range(3):
        _png(outside / f"{i}.png")
    (root / "set" / "train" / "c").symlink_to(outside, target_is_directory=True)
    (root / "set" / "train" / "a" / "leak.png").symlink_to(outside / "0.png")
    raw = {"data": {"name": "image_folder", "root": str(root), "path": "set", "image_size": 16}}
    data = load_split(resolve(raw, only=()), "train")
    assert data.classes == ["a", "b"] and len(data) == 4
    raw["data"]["follow_symlinks"] = True
    assert len(load_split(resolve(raw, only=()), "train")) == 8


def test_decompression_bomb_is_one_line(tmp_path: Path, tiny_recipe: Path, monkeypatch) -> None:
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 40×40 image is then 16× over the limit
    root = tmp_path / "data"
    for c in ("a", "b"):
        _png(root / "set" / "train" / c / "0.png")
    result = CliRunner().invoke(main, ["pretrain", str(tiny_recipe), "--quiet", *_image_folder(root)])
    assert_one_line_error(result)
    assert "decompression bomb" in result.stderr
    assert not (tiny_recipe.parent / "runs").exists()


def _cifar_batch(root: Path, batch: dict) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))


@pytest.mark.parametrize("case", ["huge labels", "bytes claim", "negative labels"])
def test_hostile_cifar_files_are_one_line(tmp_path: Path, tiny_recipe: Path, case: str) -> None:
    import numpy as np
    root = tmp_path / "data"
    data = np.zeros((4, 3072), dtype=np.uint8)
    if case == "huge labels":
        _cifar_batch(root, {"data": data, "labels": [10**30] * 4})
    elif case == "negative labels":
        _cifar_batch(root, {"data": data, "labels": [-5] * 4})
    else:
        _cifar_batch(root, {"data": data, "labels": [0] * 4})
        # BINBYTES8 claiming 2**62 bytes of data
        bomb = b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"xx"
        (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(bomb)
    result = CliRunner().invoke(main, ["pretrain", str(tiny_recipe), "--quiet", "--set=data.name='cifar10'",
                                       f"--set=data.root={json.dumps(str(root))}", "--set=data.limit=0"])
    assert_one_line_error(result)
    assert not (tiny_recipe.parent / "runs").exists()


def test_plugins_and_recipe_show_survive_a_broken_plugin(tiny_recipe: Path, register_methods) -> None:
    import dataclasses

    @dataclasses.dataclass
    class Opts:
        x: int = 1

    from rsslctl.method.base import Method

    class Raises(Method):  # a method plugin subclasses Method (hookspecs); this one raises when built
        """Raises when built."""
        name, Options = "raises_on_build", Opts

        def __init__(self, *a):
            raise RuntimeError("boom")
    register_methods(Raises)
    assert CliRunner().invoke(main, ["plugins"]).exit_code == 0
    assert CliRunner().invoke(main, ["recipe", "show", str(tiny_recipe), "--set", "method.name=raises_on_build",
                                     "--set", "attack.name=none"]).exit_code == 0
    result = CliRunner().invoke(main, ["pretrain", str(tiny_recipe), "--quiet", "--set", "method.name=raises_on_build",
                                       "--set", "attack.name=none"])
    assert result.exit_code in (1, 2) and "\n" not in result.stderr.strip() and "Traceback" not in result.output
    assert not (tiny_recipe.parent / "runs").exists()


# -- the real Trainer: refusals raised while building or stepping it are fuzzed too ---------------------------------

#: pinned after the fuzzed overrides (the last --set wins), so each example trains one step of 8 images
ONE_STEP = ["data.limit=8", "schedule.batch_size=8", "schedule.epochs=1", "schedule.warmup_epochs=0"]
#: refusals that come after training started and keep the run directory on purpose (it holds what can be resumed)
KEEPS_RUN = ("loss became",)


@settings(max_examples=6, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(overrides=st.lists(override, min_size=1, max_size=2))
def test_fuzzed_overrides_on_the_real_trainer_give_a_run_or_one_line(overrides: list[str], tiny_recipe: Path) -> None:
    import shutil
    out = tiny_recipe.parent / "real-runs"
    shutil.rmtree(out, ignore_errors=True)
    args = ["pretrain", str(tiny_recipe), "--quiet"]
    for o in overrides:
        if not o.startswith(("run.output_dir", "data.root")):
            args += ["--set", o]
    for o in ONE_STEP + [f"run.output_dir={json.dumps(str(out))}"]:
        args += ["--set", o]
    result = CliRunner().invoke(main, args)
    event(f"exit {result.exit_code}")
    if result.exit_code == 0:
        return
    assert_one_line_error(result)
    if not any(k in result.stderr for k in KEEPS_RUN):
        assert not out.exists() or not any(out.iterdir()), (result.stderr, sorted(out.rglob("*")))
