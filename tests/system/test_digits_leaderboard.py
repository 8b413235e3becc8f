"""benchmarks/digits_leaderboard.py: every row validates as a sweep, and the paper-direction verdicts."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
from cli_helpers import run

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "digits_leaderboard.py"
spec = importlib.util.spec_from_file_location("digits_leaderboard", SCRIPT)
board = importlib.util.module_from_spec(spec)
spec.loader.exec_module(board)


@pytest.mark.parametrize("label", list(board.ROWS))
def test_every_row_is_a_valid_sweep(label: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    teacher_run: Path) -> None:
    monkeypatch.setattr(board, "teacher_dir", lambda args: teacher_run)
    args = argparse.Namespace(seeds=[0, 1, 2], out=tmp_path, extra=["--dry-run"])
    result = run(*board.sweep_command(label, args))
    assert result.exit_code == 0, result.output
    assert not (tmp_path / board.slug(label)).exists()  # a dry run starts nothing


def stat(mean: float, std: float) -> dict:
    return {"mean": mean, "std": std}


def test_directions_say_whether_the_paper_holds_beyond_the_spread() -> None:
    cmp = {"rows": [
        {"name": "simclr", "evaluation": "probe", "figures": {"clean": stat(90, 1), "PGD-20": stat(60, 3)}},
        {"name": "acl", "evaluation": "probe", "figures": {"clean": stat(91, 1), "PGD-20": stat(75, 2)}},
        {"name": "rocl", "evaluation": "probe", "figures": {"clean": stat(88, 1), "PGD-20": stat(62, 4)}},
        {"name": "clae", "evaluation": "probe", "figures": {"clean": stat(85, 1), "PGD-20": stat(50, 1)}},
    ]}
    lines = board.directions(cmp, ["SimCLR", "ACL", "RoCL", "CLAE", "IFM"]).splitlines()
    assert len(lines) == 5  # header, rule, three rows: SimCLR has no twin, IFM was not run
    assert lines[2] == "| ACL | SimCLR | PGD-20 above SimCLR | +15.00 points | yes (beyond the spread) |"
    assert lines[3].endswith("| +2.00 points | yes (within the spread) |")
    assert lines[4] == "| CLAE | SimCLR | clean above SimCLR | -5.00 points | no, reversed (beyond the spread) |"
