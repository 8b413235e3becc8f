"""Helpers shared by the CLI tests: invoke ``rsslctl`` in-process and check the one-line error promise."""
from __future__ import annotations

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


class TinyLinear(nn.Module):
    """A seeded linear classifier on 3×8×8 images: the smallest model an attack or evaluation can run against."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))
