"""Log files read back on resume (the CSVs and metrics.jsonl): streamed (bounded memory), regular files only, one line
for undecodable ones."""
from __future__ import annotations

import csv
import json
import os
import tracemalloc
from pathlib import Path

import pytest

from rsslctl.base.errors import UserError
from rsslctl.run.logs import CsvLog, filter_jsonl


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_resume_keeps_the_rows_before_the_purge_step_and_the_header_grows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    log = CsvLog(path, 0)
    for step in range(5):
        log.write({"step": step, "loss": step / 10})
    log.write({"step": 5, "loss": 0.5, "knn_accuracy": 0.9})  # a new column rewrites the header
    assert [r["step"] for r in _rows(path)] == ["0", "1", "2", "3", "4", "5"]
    assert _rows(path)[0]["knn_accuracy"] == "" and _rows(path)[5]["knn_accuracy"] == "0.9"
    CsvLog(path, 3)  # resumed from the checkpoint that covers steps 0-2
    assert [r["step"] for r in _rows(path)] == ["0", "1", "2"]
    assert list(_rows(path)[0]) == ["step", "loss", "knn_accuracy"]


def test_a_long_log_is_filtered_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows([i, 0.123456789, 0.05] for i in range(200_000))  # ~5 MB of rows
    tracemalloc.start()
    CsvLog(path, 150_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000, f"peak {peak} bytes: the log was read into memory"
    assert sum(1 for _ in open(path)) == 1 + 150_000


@pytest.mark.parametrize("device", ["/dev/full", "/dev/zero"])
def test_a_log_that_links_to_a_device_is_refused(tmp_path: Path, device: str) -> None:
    if not os.path.exists(device):
        pytest.skip(f"no {device} here")
    path = tmp_path / "epochs.csv"
    path.symlink_to(device)
    with pytest.raises(UserError, match="epochs.csv: not a regular file"):
        CsvLog(path, 10)


def test_a_folder_where_the_log_goes_is_refused(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").mkdir()
    with pytest.raises(UserError, match="not a regular file"):
        CsvLog(tmp_path / "metrics.csv", 10)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x01binary" * 50, b"step,loss\n1," + b"9" * 200_000 + b"\n"])
def test_an_undecodable_log_is_one_line_and_left_as_it_was(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "metrics.csv"
    path.write_bytes(content)
    with pytest.raises(UserError, match="metrics.csv: not a CSV log this run wrote") as caught:
        CsvLog(path, 10)
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == content and not list(tmp_path.glob(".*.tmp"))


# -- metrics.jsonl -----------------------------------------------------------------------------------------------------
def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_jsonl_resume_keeps_the_records_before_the_purge_step_and_drops_a_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"kind": "step", "step": i}) + "\n" for i in range(6)) + '{"kind": "st')
    filter_jsonl(path, lambda r: r["step"] < 4)
    assert _steps(path) == [0, 1, 2, 3] and path.read_text().endswith("}\n")
    filter_jsonl(tmp_path / "absent.jsonl", lambda r: True)  # no log yet: nothing to do
    assert not (tmp_path / "absent.jsonl").exists() and not list(tmp_path.glob(".*.tmp-*"))


def test_a_long_jsonl_log_is_filtered_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as fh:
        fh.writelines(json.dumps({"kind": "step", "step": i, "loss": 0.123456789}) + "\n" for i in range(200_000))
    tracemalloc.start()
    filter_jsonl(path, lambda r: r["step"] < 150_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000, f"peak {peak} bytes: the log was read into memory"
    assert sum(1 for _ in open(path)) == 150_000


@pytest.mark.parametrize("device", ["/dev/full", "/dev/zero"])
def test_a_jsonl_log_that_links_to_a_device_is_refused(tmp_path: Path, device: str) -> None:
    if not os.path.exists(device):
        pytest.skip(f"no {device} here")
    path = tmp_path / "metrics.jsonl"
    path.symlink_to(device)
    with pytest.raises(UserError, match="metrics.jsonl: not a regular file") as caught:
        filter_jsonl(path, lambda r: True)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("content", [b'{"step": 1}\n\xff\xfe\x00\x01binary\n' * 50,
                                     b'{"step": 1}\n' + b"9" * (2 << 20)])
def test_an_undecodable_jsonl_log_is_one_line_and_left_as_it_was(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match="metrics.jsonl: not a metrics log this run wrote") as caught:
        filter_jsonl(path, lambda r: True)
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == content and not list(tmp_path.glob(".*.tmp-*"))


def test_wandb_without_the_package_is_refused_before_the_run_directory_exists(tiny_recipe: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from cli_helpers import assert_user_error, run
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, whether or not it is here
    sets = ["--set", "logging.wandb=true", "--set", "schedule.epochs=1"]
    assert_user_error(run("recipe", "show", str(tiny_recipe), *sets), "logging.wandb = true", "pip install wandb")
    assert_user_error(run("pretrain", str(tiny_recipe), *sets, "--quiet"), "logging.wandb = true",
                      "logging.wandb = false")
    assert not (tmp_path / "runs").exists()
