"""Run directories: creation without clobbering, the resolved recipe, export of the encoder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, save_tensors
from .errors import UserError
from .recipe import Recipe, dumps_toml, load

RECIPE_FILE = "recipe.toml"


def prepare_run_dir(recipe: Recipe, run_dir: Path | None, force: bool) -> Path:
    """Create the run directory; an existing one is only replaced with ``force``."""
    run_dir = Path(run_dir) if run_dir else Path(recipe.run.output_dir) / recipe.run.name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise UserError(f"{run_dir}: run directory already exists; pass --force to replace it, "
                            f"--resume {run_dir} to continue it, or --set run.name=NEW")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RECIPE_FILE, dumps_toml(recipe.resolved))
    return run_dir


def load_run_recipe(run_dir: Path, overrides: list[str] = ()) -> Recipe:
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no {RECIPE_FILE}); pass the directory `rsslctl pretrain` created")
    return load(path, overrides)


def load_trained_method(run_dir: Path, recipe: Recipe, device: Any, purpose: str) -> tuple[Any, Path, dict[str, Any]]:
    """(method with the weights of the run's newest checkpoint, that checkpoint, its meta); ``purpose`` names the
    command in the error raised when the run has no checkpoint yet."""
    from .engine import build_method
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir}: no checkpoint to {purpose} yet; run `rsslctl pretrain` first")
    method = build_method(recipe, device)
    model_state, _, meta = load_checkpoint(ckpt)
    method.load_state_dict(model_state)
    return method, ckpt, meta


def export_encoder(run_dir: Path, out: Path | None = None, route: str = "auto") -> tuple[Path, dict[str, Any]]:
    """Write the backbone alone (one BN route) as safetensors in the backbone library's own key layout."""
    from .encoder import single_bn_state

    import torch
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir)
    method, _, meta = load_trained_method(run_dir, recipe, torch.device("cpu"), "export")
    encoder = method.eval_encoder()
    if route == "auto":
        route = "pgd" if encoder.dual_bn else "normal"
    backbone = recipe.plugin_cls["backbone"](recipe.plugin["backbone"])
    info = {"backbone": backbone.export_info(), "bn_route": route, "epoch": meta["epoch"],
            "input": "RGB in [0, 1], normalise with mean/std below before the backbone",
            "mean": list(recipe.encoder.mean), "std": list(recipe.encoder.std), "source_run": str(run_dir.resolve())}
    out = Path(out) if out else run_dir / "encoder.safetensors"
    save_tensors(out, single_bn_state(encoder.backbone, route), {"rsslctl": info})
    atomic_write_text(out.with_suffix(".json"), json.dumps(info, indent=2))
    return out, info
