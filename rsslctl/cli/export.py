"""`rsslctl export`: the encoder of a run alone, as safetensors in the backbone library's own key layout."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from rsslctl.base import registry
from rsslctl.base.console import console
from rsslctl.base.errors import UserError
from rsslctl.base.options import validate
from rsslctl.cli.common import user_errors
from rsslctl.run.directory import RECIPE_FILE, check_output, load_run_recipe


def export_encoder(run_dir: Path, out: Path | None = None, route: str = "auto", force: bool = False
                   ) -> tuple[Path, dict[str, Any]]:
    """Write the backbone alone (one BN route) as safetensors in the backbone library's own key layout, plus its
    description as JSON beside it; existing files are only replaced with ``force``."""
    import torch  # here, not at the top: `rsslctl export --help` imports no torch

    from rsslctl.nn.encoder import single_bn_state
    from rsslctl.run.build import load_trained_method
    from rsslctl.runtime.checkpoint import CKPT_DIR, atomic_write_text, save_tensors
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "encoder.safetensors"
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: name a .safetensors file (its description is written beside it as .json)")
    reads = [run_dir / RECIPE_FILE, run_dir / CKPT_DIR, run_dir / "metrics.jsonl"]
    for path, what in ((out, "--out file"), (out.with_suffix(".json"), "--out description file")):
        check_output(path, reads, what, force)
    recipe = load_run_recipe(run_dir)
    method, _, meta = load_trained_method(run_dir, recipe, torch.device("cpu"), "export")
    encoder = method.eval_encoder()
    if route == "auto":
        route = "pgd" if encoder.dual_bn else "normal"
    info = {"backbone": recipe.backbone.build().export_info(), "bn_route": route, "epoch": meta["epoch"],
            "input": "RGB in [0, 1], normalise with mean/std below before the backbone",
            "mean": list(recipe.encoder.mean), "std": list(recipe.encoder.std), "source_run": str(run_dir.resolve())}
    weights = single_bn_state(encoder.backbone, route)
    atomic_write_text(out.with_suffix(".json"), json.dumps(info, indent=2))
    try:  # the description first, the weights last: a failure leaves no weights without their description
        save_tensors(out, weights, {"rsslctl": info})
    except BaseException:
        out.with_suffix(".json").unlink(missing_ok=True)
        raise
    return out, info


def export_classifier(run_dir: Path, mode: str, out: Path | None = None, force: bool = False) -> tuple[Path, Path]:
    """Write the fine-tuned classifier of ``run_dir/finetune/<mode>`` in the backbone library's own layout (classifier
    included) plus a Python module with ``load_model(path)``; returns (weights, module)."""
    import torch

    from rsslctl.runtime.checkpoint import atomic_write_text, save_tensors
    from rsslctl.train.classify import load_classifier, mode_dir
    out = Path(out) if out else Path(run_dir) / f"classifier_{mode}.safetensors"
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: name a .safetensors file (its loading module is written beside it as .py)")
    for path, what in ((out, "--out file"), (out.with_suffix(".py"), "--out module file")):
        check_output(path, [mode_dir(run_dir, mode)], what, force)
    net, info = load_classifier(mode_dir(run_dir, mode), torch.device("cpu"))
    spec = info["backbone"]
    backbone = registry.get("backbone", spec["name"], "backbone.name")(
        validate(registry.get("backbone", spec["name"]).Options, dict(spec["options"]), "backbone"))
    prefix, source = backbone.classifier_export(info["num_classes"])
    if not prefix:
        raise UserError(f"{run_dir}: backbone '{spec['name']}' cannot export a standalone classifier")
    state = {**{k[len("body.backbone."):]: v for k, v in net.state_dict().items() if k.startswith("body.backbone.")},
             f"{prefix}.weight": net.head.weight, f"{prefix}.bias": net.head.bias}
    meta = {"mean": info["mean"], "std": info["std"], "classes": info["classes"], "backbone": spec,
            "finetune": info["config"], "source": str(mode_dir(run_dir, mode)), "input": "RGB pixels in [0, 1]"}
    save_tensors(out, state, {"rsslctl": meta})
    module = out.with_suffix(".py")
    atomic_write_text(module, source)
    return out, module


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (default RUN_DIR/encoder.safetensors, or RUN_DIR/classifier_MODE.safetensors).")
@click.option("--route", type=click.Choice(["auto", "normal", "pgd"]), default="auto", show_default=True,
              help="BN route of a dual-BN encoder to export.")
@click.option("--classifier", "mode", type=click.Choice(["SLF", "ALF", "AFF"]),
              help="Export the fine-tuned classifier of this mode (backbone + its classifier, loadable without "
                   "rsslctl).")
@click.option("--force", is_flag=True, help="Replace existing output files.")
@user_errors
def export(run_dir: Path, out: Path | None, route: str, mode: str | None, force: bool) -> None:
    """Write the encoder alone as safetensors, loadable into timm.create_model(name, num_classes=0); or, with
    --classifier, a fine-tuned classifier with a ready-to-use load_model(path) module."""
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    if mode:
        path, module = export_classifier(run_dir, mode, out, force)
        console.print(f"wrote {path} and {module}; load it with:\n  import sys; sys.path.insert(0, "
                      f"{str(module.parent)!r})\n"
                      f"  from {module.stem} import load_model\n"
                      f"  model = load_model({str(path)!r})  # pixels in [0, 1], normalisation inside", highlight=False)
        return
    path, info = export_encoder(run_dir, out, route, force)
    console.print(f"wrote {path} (BN route {info['bn_route']}); rebuild with {info['backbone']}")
