"""ImageNet-32 files that are not uint8 images with integer labels 1-1000 are refused, naming the file, instead of
being cast into other pixels or ending in an internal error."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_user_error, run

from rsslctl.base.errors import UserError
from rsslctl_plugins.datasets import imagenet32

GOOD = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)


def _write(root: Path, fmt: str, data: np.ndarray, labels: object) -> Path:
    folder = root / ("Imagenet32_val_npz" if fmt == "npz" else "Imagenet32_val")
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        path = folder / "val_data.npz"
        np.savez(path, data=data, labels=np.asarray(labels))
    else:
        path = folder / "val_data"
        path.write_bytes(pickle.dumps({"data": data, "labels": labels}))
    return path


@pytest.mark.parametrize("fmt", ["npz", "pkl"])
@pytest.mark.parametrize("data, labels, fragment", [
    (GOOD.astype(np.float64), [1, 2, 3, 4], "images stored as float64"),
    (GOOD.astype(np.int16), [1, 2, 3, 4], "images stored as int16"),
    (GOOD[:, :1024], [1, 2, 3, 4], "expected [N, 3072]"),
    (GOOD, [1, 2, 3, 2 ** 62], f"label {2 ** 62} is outside 1-1000"),
    (GOOD, [1, 0, 3, 4], "label 0 is outside 1-1000"),
    (GOOD, [1.0, float("nan"), 3.0, 4.0], "labels stored as float64"),
])
def test_bad_arrays_are_refused_naming_the_file(tmp_path: Path, fmt: str, data: np.ndarray, labels: object,
                                                fragment: str) -> None:
    path = _write(tmp_path, fmt, data, labels)
    dataset = imagenet32.Imagenet32(None, tmp_path)
    with pytest.raises(UserError) as caught:
        dataset.load("val")
    assert str(path) in str(caught.value) and fragment in str(caught.value)
    if fmt == "npz":  # the memory-mapped (streamed) source checks the same
        with pytest.raises(UserError, match="images stored|expected \\[N, 3072\\]|label|labels stored"):
            dataset.source("val")


def test_good_arrays_still_load(tmp_path: Path) -> None:
    _write(tmp_path, "npz", GOOD, np.array([1, 2, 999, 1000], dtype=np.int32))
    data = imagenet32.Imagenet32(None, tmp_path).load("val")
    assert data.labels.tolist() == [0, 1, 998, 999] and data.images.dtype.is_floating_point is False


def test_the_real_command_refuses_float_images_in_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "npz", GOOD.astype(np.float64), [1, 2, 3, 4])
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\nname = "imagenet32"\nroot = "{tmp_path}"\ntrain_split = "val"\n'
                      '[schedule]\nbatch_size = 2\nepochs = 1\n[engine]\ndevice = "cpu"\n')
    assert_user_error(run("pretrain", str(recipe), "--run-dir", str(tmp_path / "run"), "--quiet"), str(path),
                      "float64")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("checkpoint*"))
