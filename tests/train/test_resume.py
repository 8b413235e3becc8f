"""What a resume cuts from metrics.jsonl: the records written after the checkpoint it resumes from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsslctl.base.errors import UserError
from rsslctl.train.resume import truncate_metrics


def test_resume_keeps_the_steps_and_epochs_its_checkpoint_covers(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    records = [{"kind": "step", "epoch": 1, "step": 0}, {"kind": "step", "epoch": 1, "step": 1},
               {"kind": "epoch", "epoch": 1, "loss": 0.5}, {"kind": "step", "epoch": 2, "step": 2},
               {"kind": "epoch", "epoch": 2, "loss": 0.4}, {"kind": "step", "epoch": "x", "step": "y"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "step", "ep')
    truncate_metrics(path, 2, 1)  # resumed after epoch 1 (steps 0-1)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    truncate_metrics(path, 0, 0)  # no checkpoint at all: nothing is kept
    assert path.read_text() == ""


def test_resume_refuses_a_metrics_log_linked_to_a_device(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.symlink_to("/dev/full" if Path("/dev/full").exists() else "/dev/null")
    with pytest.raises(UserError, match="metrics.jsonl: not a regular file"):
        truncate_metrics(path, 10, 1)
