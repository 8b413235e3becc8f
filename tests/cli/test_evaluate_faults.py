"""`evaluate` on a full disk: one line, exit code 2, no temporary file left, earlier results untouched."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest
from cli_helpers import assert_user_error, run


def test_plot_embedding_on_a_full_disk_leaves_no_temporary_png(tiny_recipe: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure
    out = tmp_path / "run"
    result = run("pretrain", str(tiny_recipe), "--run-dir", str(out), "--quiet", "--set", "schedule.epochs=1",
                 "--set", "schedule.warmup_epochs=0", "--set", "data.limit=64")
    assert result.exit_code == 0, result.output
    (out / "embedding.png").write_bytes(b"earlier plot")  # a file of the user's beside the run's results

    def full_disk(self: Figure, fname: object, *args: object, **kwargs: object) -> None:
        Path(fname).write_bytes(b"\x89PNG half")  # the device fills up part-way through the file
        raise OSError(errno.ENOSPC, "No space left on device", str(fname))

    monkeypatch.setattr(Figure, "savefig", full_disk)
    result = run("evaluate", str(out), "--plot-embedding", "--set", "evaluation.epochs=2",
                 "--set", "evaluation.limit=32", "--set", "evaluation.steps=1")
    assert_user_error(result, "No space left on device", "free disk space")
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert (out / "embedding.png").read_bytes() == b"earlier plot"
    assert not list(out.rglob("results.json"))  # the failed evaluation stored no result
