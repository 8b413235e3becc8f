"""click's own usage errors keep the one-line promise: one stderr line naming the verb and its --help, exit 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_user_error, run


@pytest.mark.parametrize("args, fragment", [
    (["finetune", "--fraction", "abc", "RUN"], "No such option '--fraction'"),
    (["finetune", "RUN", "--mode", "XYZ"], "Invalid value for '--mode'"),
    (["finetune", "RUN", "--epochs", "0"], "Invalid value for '--epochs'"),
    (["select-coreset", "RUN", "--fraction", "0.2"], "Missing option '--out'"),
    (["evaluate"], "Missing argument 'RUN_DIR'"),
    (["--bogus"], "No such option '--bogus'"),
    (["pretrian"], "No such command 'pretrian'"),
    (["recipe", "shwo"], "No such command 'shwo'"),
])
def test_a_usage_error_is_one_line_naming_the_help(args: list[str], fragment: str) -> None:
    err = assert_user_error(run(*args), fragment)
    assert "Usage:" not in err and "--help" in err


def test_a_directory_where_a_file_is_expected_is_one_line(tmp_path: Path) -> None:
    assert_user_error(run("pretrain", str(tmp_path)), str(tmp_path))


def test_help_and_version_still_exit_zero() -> None:
    assert run("--help").exit_code == 0 and run("finetune", "--help").exit_code == 0
    assert run("--version").exit_code == 0


def test_closed_standard_output_is_an_error_not_silently_lost_output() -> None:
    proc = subprocess.run(f"'{sys.executable}' -m rsslctl recipe show quickstart >&-", shell=True,
                          capture_output=False, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "standard output is closed" in proc.stderr
