"""Every installed plugin honours its contract (the timm way: parametrised over the registry, so a new plugin — built
in or third-party — is tested the moment it is installed)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import TinyLinear
from click.testing import CliRunner
from conftest import teacher_overrides, tiny_backbone

from rsslctl.base.errors import UserError
from rsslctl.base.options import validate
from rsslctl.base.registry import Declared, registry
from rsslctl.cli import main
from rsslctl.method.coreset import SelectionContext, run_selector
from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load
from rsslctl.train.engine import Trainer


def _names(kind: str) -> list[str]:
    return registry().names(kind)


@pytest.mark.parametrize("name", _names("method"))
def test_every_method_trains_a_step_on_digits(name: str, tiny_recipe: Path, tmp_path: Path,
                                             request: pytest.FixtureRequest) -> None:
    cls = registry().get("method", name)
    overrides = [f"method.name={name!r}", "schedule.epochs=1", "data.limit=16", "schedule.batch_size=8",
                 "attack.steps=1"]
    overrides += [f"method.{k}=2" for k in ("n_views", "eval_views") if k in cls.Options.__dataclass_fields__]
    overrides += teacher_overrides(cls, request)  # two-stage methods: a tiny finished simclr run as the teacher
    if not cls.needs_attack:
        overrides.append("attack.name='none'")
    overrides += tiny_backbone(cls)  # a ViT-only method trains a tiny ViT
    recipe = load(tiny_recipe, overrides)
    run = tmp_path / name
    trainer = Trainer(recipe, run, quiet=True)
    grouped = [id(p) for g in trainer.method.parameter_groups() for p in g["params"]]  # each trained tensor once
    assert sorted(grouped) == sorted(id(p) for p in trainer.method.optimizer_parameters()), name
    before = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    prepare_run_dir(recipe, run, force=False)
    summary = trainer.fit()
    assert math.isfinite(summary["loss"])
    changed = [k for k, v in trainer.method.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, f"{name}: one optimizer step changed nothing"
    feats = trainer.method.eval().eval_features(torch.rand(2, 1, 16, 16), "normal")
    assert feats.dim() == 2 and feats.shape[0] == 2


@pytest.mark.parametrize("name", _names("attack"))
def test_every_attack_stays_in_its_ball_and_raises_its_objective(name: str) -> None:
    cls = registry().get("attack", name)
    options = validate(cls.Options, {}, "attack")
    attack = cls(options)
    model = TinyLinear()
    torch.manual_seed(1)
    x = torch.rand(16, 3, 8, 8)
    y = torch.randint(0, 10, (16,))
    objective = lambda xa: F.cross_entropy(model(xa), y, reduction="sum")  # noqa: E731
    weights_before = model.lin.weight.clone()
    adv = attack.perturb(x, objective)
    delta = (adv - x).flatten(1)
    size = delta.norm(dim=1) if getattr(options, "norm", "linf") == "l2" else delta.abs().max(1).values
    assert (size <= attack.eps + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
    assert float(objective(adv).detach()) > float(objective(x).detach())
    assert model.lin.weight.grad is None and torch.equal(model.lin.weight, weights_before)  # input gradients only


@pytest.mark.parametrize("name", _names("dataset"))
def test_every_dataset_validates_its_defaults_and_reports_missing_files(name: str, tmp_path: Path) -> None:
    cls = registry().get("dataset", name)
    options = validate(cls.Options, {}, "data")
    cls.check_options(options, "data")
    assert cls.splits and isinstance(cls.hyperparameter_column(32), str)
    dataset = cls(options, tmp_path / "empty")
    try:
        data = dataset.load(cls.splits[0])  # datasets that ship their data (digits) load; others say what is missing
    except UserError as exc:
        assert str(tmp_path) in str(exc) or name in str(exc)
    else:
        assert data.images.dtype == torch.uint8 and len(data) == len(data.labels)


@pytest.mark.parametrize("name", _names("coreset"))
def test_every_selector_returns_its_budget_of_distinct_pool_indices(name: str, tiny_recipe: Path) -> None:
    from rsslctl.run.build import build_method, load_train_split
    recipe = load(tiny_recipe)
    method = build_method(recipe, torch.device("cpu"))
    train = load_train_split(recipe)
    cls = registry().get("coreset", name)
    selector = cls(validate(cls.Options, {"steps": 1} if "steps" in cls.Options.__dataclass_fields__ else {}, "c"))
    pool, validation = torch.arange(8, 96), torch.arange(8)
    out = run_selector(selector, SelectionContext(train.images, train.labels, pool, validation, 32, 0, method), 32)
    assert len(out) == 32 and len(out.unique()) == 32 and out.min() >= 8


@pytest.mark.parametrize("declared, package", [(d, p) for d, _, p, _ in registry().declarations()],
                         ids=lambda v: f"{v.kind}:{v.name}" if isinstance(v, Declared) else "")
def test_every_lazy_declaration_is_what_its_module_provides(declared: Declared, package: str) -> None:
    """A declaration stands in for its class until the class is needed: both must say the same."""
    reg = registry()
    if declared.kind == "command":
        command = reg.command(next(i for i in reg.command_infos() if (i.name, i.package) == (declared.name, package)))
        assert command.name == declared.name and command.help.strip().splitlines()[0] == declared.doc
        return
    cls = reg.get(declared.kind, f"{package}:{declared.name}")
    assert cls.name == declared.name and cls.Options is declared.options
    assert (cls.__doc__ or "").strip().splitlines()[0] == declared.doc
    assert cls.citation == declared.citation
    assert getattr(cls, "needs_attack", False) == declared.needs_attack


@pytest.mark.parametrize("name", _names("backbone"))
def test_every_backbone_builds_with_its_defaults(name: str) -> None:
    cls = registry().get("backbone", name)
    model = cls(validate(cls.Options, {}, "backbone")).build()
    assert int(model.num_features) > 0


def test_a_third_party_package_adds_a_method_an_attack_a_selector_and_a_verb(tiny_recipe: Path, tmp_path: Path) -> None:
    ours = {(i.kind, i.name) for i in registry().all() if i.package == "rsslctl-example-plugin" and not i.error}
    assert {("method", "align_uniform"), ("attack", "mifgsm"), ("coreset", "kcenter")} <= ours
    run = tmp_path / "run"
    cli = CliRunner()
    result = cli.invoke(main, ["pretrain", str(tiny_recipe), "--run-dir", str(run), "--quiet", "--set",
                               "method.name='acl'", "--set", "attack.name='mifgsm'", "--set",
                               "schedule.epochs=2", "--set", "coreset.name='kcenter'", "--set", "coreset.fraction=0.4",
                               "--set", "coreset.warmup_epochs=1"])
    assert result.exit_code == 0, result.output
    result = cli.invoke(main, ["count-params", str(run)])
    assert result.exit_code == 0 and "parameters" in result.output, result.output
