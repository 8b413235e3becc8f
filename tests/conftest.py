"""Shared fixtures: a tiny recipe (digits at 16 px, narrow ResNet-18) that trains in seconds on CPU."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("COLUMNS", "200")  # rich tables unwrapped in captured output

TINY = """
[run]
name = "tiny"
seed = 3

[data]
name = "digits"
image_size = 16
limit = 96

[backbone]
name = "timm"
model = "resnet18"
model_kwargs = { channels = [8, 16, 16, 16] }

[encoder]
head_layers = 2
head_dim = 32

[method]
name = "acl"

[attack]
name = "pgd"
steps = 1

[optimizer]
name = "sgd"
lr = 0.05

[schedule]
epochs = 3
batch_size = 32
warmup_epochs = 1

[engine]
device = "cpu"
log_every = 2

[evaluation]
epochs = 30
lr = 0.05
steps = 2
limit = 64
"""


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace('name = "tiny"', 'name = "tiny"\noutput_dir = "' + str(tmp_path / "runs") + '"'))
    return path
