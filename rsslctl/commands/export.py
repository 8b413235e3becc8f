"""`rsslctl export`: the encoder of a run alone, as safetensors in the backbone library's own key layout."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch

from ..build import load_trained_method
from ..checkpoint import atomic_write_text, save_tensors
from ..encoder import single_bn_state
from ..runs import load_run_recipe
from ..ui import console
from .common import user_errors


def export_encoder(run_dir: Path, out: Path | None = None, route: str = "auto") -> tuple[Path, dict[str, Any]]:
    """Write the backbone alone (one BN route) as safetensors in the backbone library's own key layout."""
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir)
    method, _, meta = load_trained_method(run_dir, recipe, torch.device("cpu"), "export")
    encoder = method.eval_encoder()
    if route == "auto":
        route = "pgd" if encoder.dual_bn else "normal"
    info = {"backbone": recipe.backbone.build().export_info(), "bn_route": route, "epoch": meta["epoch"],
            "input": "RGB in [0, 1], normalise with mean/std below before the backbone",
            "mean": list(recipe.encoder.mean), "std": list(recipe.encoder.std), "source_run": str(run_dir.resolve())}
    out = Path(out) if out else run_dir / "encoder.safetensors"
    save_tensors(out, single_bn_state(encoder.backbone, route), {"rsslctl": info})
    atomic_write_text(out.with_suffix(".json"), json.dumps(info, indent=2))
    return out, info


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output file (default RUN_DIR/encoder.safetensors).")
@click.option("--route", type=click.Choice(["auto", "normal", "pgd"]), default="auto", show_default=True,
              help="BN route of a dual-BN encoder to export.")
@user_errors
def export(run_dir: Path, out: Path | None, route: str) -> None:
    """Write the encoder alone as safetensors, loadable into timm.create_model(name, num_classes=0)."""
    path, info = export_encoder(run_dir, out, route)
    console.print(f"wrote {path} (BN route {info['bn_route']}); rebuild with {info['backbone']}")
