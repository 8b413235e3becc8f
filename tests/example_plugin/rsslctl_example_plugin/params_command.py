"""An extra CLI verb, `rsslctl count-params RUN_DIR`, contributed through the rsslctl_commands hook."""
from __future__ import annotations

from pathlib import Path

import click

from rsslctl import hookimpl, load_run_recipe, user_errors


@click.command("count-params")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@user_errors
def count_params(run_dir: Path) -> None:
    """Print the parameter count of a run's method and of its evaluated encoder."""
    import torch  # here, not at the top: `rsslctl count-params --help` stays instant

    from rsslctl import load_trained_method
    method, _, _ = load_trained_method(run_dir, load_run_recipe(run_dir), torch.device("cpu"), "count")
    total = sum(p.numel() for p in method.parameters())
    encoder = sum(p.numel() for p in method.eval_encoder().parameters())
    click.echo(f"method {total} parameters, encoder {encoder}")


@hookimpl
def rsslctl_commands() -> list:
    return [count_params]
