"""`rsslctl export`: the encoder of a run alone, as safetensors in the backbone library's own key layout."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch

from ..build import load_trained_method
from ..checkpoint import CKPT_DIR, atomic_write_text, save_tensors
from ..encoder import single_bn_state
from ..errors import UserError
from ..runs import RECIPE_FILE, check_output, load_run_recipe
from ..ui import console
from .common import user_errors


def export_encoder(run_dir: Path, out: Path | None = None, route: str = "auto", force: bool = False
                   ) -> tuple[Path, dict[str, Any]]:
    """Write the backbone alone (one BN route) as safetensors in the backbone library's own key layout, plus its
    description as JSON beside it; existing files are only replaced with ``force``."""
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


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output file (default RUN_DIR/encoder.safetensors).")
@click.option("--route", type=click.Choice(["auto", "normal", "pgd"]), default="auto", show_default=True,
              help="BN route of a dual-BN encoder to export.")
@click.option("--force", is_flag=True, help="Replace existing output files.")
@user_errors
def export(run_dir: Path, out: Path | None, route: str, force: bool) -> None:
    """Write the encoder alone as safetensors, loadable into timm.create_model(name, num_classes=0)."""
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    path, info = export_encoder(run_dir, out, route, force)
    console.print(f"wrote {path} (BN route {info['bn_route']}); rebuild with {info['backbone']}")
