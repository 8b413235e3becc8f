"""Helpers shared by the CLI tests: invoke ``rsslctl`` in-process and check the one-line error promise."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner, Result
from torch import nn

from rsslctl.cli import main


def run(*args: str) -> Result:
    """``rsslctl ARGS…`` in-process (stdout and stderr captured separately)."""
    return CliRunner().invoke(main, list(args))


def assert_user_error(result: Result, *fragments: str) -> str:
    """Bad input: exit code 2, exactly one stderr line starting 'error:', no traceback, containing ``fragments``."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in err, err
    return err


def evaluate_finetune_export(run_dir: Path) -> dict[str, torch.Tensor]:
    """An (imported) run through ``evaluate``, an SLF ``finetune`` and ``export`` at the smallest budget, each
    checked to succeed on 32 test images; the exported encoder's tensors."""
    from safetensors.torch import load_file

    result = run("evaluate", str(run_dir), "--json", "--set", "evaluation.epochs=2", "--set", "evaluation.limit=32",
                 "--set", "evaluation.steps=1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["test_images"] == 32
    result = run("finetune", str(run_dir), "--mode", "SLF", "--epochs", "1", "--batch-size", "32", "--train-steps",
                 "1", "--pgd-steps", "1", "--test-limit", "32", "--eps-curve", "0,8", "--set", "data.limit=64",
                 "--quiet", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["modes"]["SLF"]["test_images"] == 32
    assert run("export", str(run_dir)).exit_code == 0
    return load_file(str(run_dir / "encoder.safetensors"))


def reference_bn(prefix: str, c: int, routes: int, g: torch.Generator, tracked: int | None = None
                 ) -> dict[str, torch.Tensor]:
    """A BatchNorm in the ACL-family reference layout: ``bn_list.{0..routes-1}.*`` (routes 0: a plain BN), random
    affine and running statistics; ``num_batches_tracked`` is ``tracked`` (default 7 + the route)."""
    out = {}
    for r in range(routes) if routes else [None]:
        p = f"{prefix}.bn_list.{r}." if r is not None else f"{prefix}."
        out[p + "weight"] = torch.rand(c, generator=g) + 0.5
        out[p + "bias"] = torch.randn(c, generator=g) * 0.1
        out[p + "running_mean"] = torch.randn(c, generator=g) * 0.1
        out[p + "running_var"] = torch.rand(c, generator=g) + 0.5
        out[p + "num_batches_tracked"] = torch.tensor(7 + (r or 0) if tracked is None else tracked)
    return out


class TinyLinear(nn.Module):
    """A seeded linear classifier on 3×8×8 images: the smallest model an attack or evaluation can run against."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))
