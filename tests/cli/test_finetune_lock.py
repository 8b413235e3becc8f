"""Two fine-tunings into one run directory cannot collide: the second is refused in one line naming the first."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cli_helpers import assert_user_error, run

HOLD = """
import sys, time
from rsslctl.run.directory import RunLock
RunLock(sys.argv[1], "fine-tuning").acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_finetune_is_refused_while_one_runs(tiny_recipe: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run("pretrain", str(tiny_recipe), "--run-dir", str(run_dir), "--quiet", "--set", "schedule.epochs=1",
               "--set", "schedule.warmup_epochs=0").exit_code == 0
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir / "finetune")], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        before = sorted(p.name for p in run_dir.rglob("*"))
        assert_user_error(run("finetune", str(run_dir), "--mode", "SLF", "--epochs", "1", "--quiet"),
                          "in use by", "fine-tuning")
        assert sorted(p.name for p in run_dir.rglob("*")) == before  # nothing written or removed
    finally:
        other.kill()
        other.wait()
