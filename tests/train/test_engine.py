"""Engine behaviour: training runs, exact resume after a kill, NaN stop, checkpoint integrity, export."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import final_checkpoint, kill_and_resume, same_final_checkpoints, sigkill_and_resume, train_run
from safetensors.torch import load_file

from rsslctl.base.errors import TrainingDiverged, UserError
from rsslctl.cli.export import export_encoder
from rsslctl.method.base import Method
from rsslctl.nn.encoder import apply_cifar_stem
from rsslctl.run.directory import prepare_run_dir
from rsslctl.run.recipe import load
from rsslctl.runtime.checkpoint import latest_checkpoint, load_checkpoint
from rsslctl.train.engine import Trainer

CLI = [sys.executable, "-m", "rsslctl.cli"]


def _train(recipe_path: Path, run_dir: Path, overrides: list[str] = (), on_step=None) -> Trainer:
    return train_run(load(recipe_path, list(overrides)), run_dir, on_step)


def test_training_writes_metrics_checkpoints_and_recipe(tiny_recipe: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(tiny_recipe, run)
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(9))  # 3 epochs × 3 steps, one line each
    assert all({"loss", "lr", "loss_nat", "loss_adv"} <= set(r) for r in steps)
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3]
    assert steps[0]["lr"] < steps[2]["lr"]  # warm-up
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "epoch-0003"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["recipe"]["method"]["name"] == "acl" and "method:acl" in meta["plugins"]
    assert (run / "recipe.toml").read_text().count("[method]") == 1
    assert load(run / "recipe.toml").resolved == load(tiny_recipe).resolved


def test_interrupted_then_resumed_equals_uninterrupted(tiny_recipe: Path, tmp_path: Path) -> None:
    full, broken = tmp_path / "full", tmp_path / "broken"
    _train(tiny_recipe, full)

    def only_epochs_1_and_2_saved(run: Path) -> None:
        assert latest_checkpoint(run).name == "epoch-0002"

    # step 7: epoch 3 (steps 6-8) is half done; only epochs 1-2 are checkpointed
    kill_and_resume(load(tiny_recipe), broken, 7, reference=full, before_resume=only_epochs_1_and_2_saved)
    steps = [json.loads(ln)["step"] for ln in (broken / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "step"]
    assert steps == list(range(9))  # the killed run's partial epoch was dropped from the log


def test_sigkill_and_cli_resume_match_uninterrupted_run(tiny_recipe: Path, tmp_path: Path) -> None:
    """A real process killed with SIGKILL after its first checkpoint resumes to identical weights."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(CLI + ["pretrain", str(tiny_recipe), "--run-dir", str(full), "--quiet"], check=True)
    sigkill_and_resume([str(tiny_recipe)], killed)  # killed after its first checkpoint, before its last
    same_final_checkpoints(full, killed)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_recipe: Path, tmp_path: Path, register_methods) -> None:
    class NanAfterEpoch1(Method):
        """Returns a finite loss in epoch 1, NaN afterwards."""

        name = "nan_after_epoch1"

        def on_epoch_start(self, epoch: int, total: int) -> None:
            self.epoch = epoch

        def training_step(self, images, labels):
            loss = self.encoder(images.float() / 255).pow(2).mean()
            return (loss if self.epoch == 1 else loss * float("nan")), {}

    register_methods(NanAfterEpoch1)
    run = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2.*epoch-0001"):
        _train(tiny_recipe, run, ["method.name=nan_after_epoch1", "attack.name=none"])
    assert latest_checkpoint(run).name == "epoch-0001"
    model, _, _ = load_checkpoint(latest_checkpoint(run))
    assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


def test_corrupted_checkpoint_is_detected(tiny_recipe: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(tiny_recipe, run, ["schedule.epochs=1"])
    ckpt = latest_checkpoint(run)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        load_checkpoint(ckpt)


def test_no_partial_checkpoint_directory_is_ever_visible(tiny_recipe: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(tiny_recipe, run, ["engine.keep_checkpoints=1"])
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["epoch-0003"]  # temporary directories renamed away, older ones pruned


def test_existing_run_dir_is_not_overwritten(tiny_recipe: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    recipe = load(tiny_recipe)
    with pytest.raises(UserError, match="already exists.*--force"):
        prepare_run_dir(recipe, run, force=False)
    assert (run / "precious.txt").read_text() == "keep me"


def test_export_loads_into_plain_timm_model(tiny_recipe: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = _train(tiny_recipe, run, ["schedule.epochs=1"])
    out, info = export_encoder(run)
    assert info["bn_route"] == "pgd" and info["backbone"]["cifar_stem"] is True
    model = timm.create_model("resnet18", num_classes=0, channels=(8, 16, 16, 16))
    apply_cifar_stem(model)
    model.load_state_dict(load_file(str(out)), strict=True)
    model.eval()
    enc = trainer.method.encoder.eval()
    x = torch.rand(4, 3, 16, 16)
    mean, std = torch.tensor(info["mean"]).view(1, 3, 1, 1), torch.tensor(info["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model((x - mean) / std), enc.features(x, "pgd"), atol=1e-5)


def test_free_adversarial_training_resumes_exactly(tiny_recipe: Path, tmp_path: Path) -> None:
    """Free AT keeps δ across minibatches and epochs; it is checkpointed, so a resumed run matches."""
    free = ["method.name=simclr_adv", "method.training=free", "method.replays=2"]
    full = tmp_path / "full"
    _train(tiny_recipe, full, free)

    def delta_saved(run: Path) -> None:
        assert final_checkpoint(run)[1]["method.free_delta"].abs().max() > 0  # a non-trivial δ was saved

    # step 14: epoch 3 = optimizer steps 12-17
    kill_and_resume(load(tiny_recipe, free), tmp_path / "broken", 14, reference=full, before_resume=delta_saved)
