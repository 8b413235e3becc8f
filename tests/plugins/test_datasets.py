"""Dataset plugins: tiny files in the real on-disk formats, exact pixels/labels/classes, one-line errors."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from rsslctl.base.errors import UserError
from rsslctl.base.options import validate
from rsslctl.base.registry import Registry
from rsslctl.data.dataset import ImageData, safe_unpickle
from rsslctl_plugins.datasets import cifar, digits, image_folder, imagenet32, stl10, svhn

RNG = np.random.default_rng(0)


def rand_images(n: int, size: int = 32) -> np.ndarray:
    """Random uint8 images [N, 3, size, size] (C, H, W), the layout every loader must return."""
    return RNG.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)


def check(data: ImageData, images: np.ndarray, labels: list[int], classes: list[str], name: str) -> None:
    assert isinstance(data, ImageData) and data.name == name
    assert data.images.dtype == torch.uint8 and data.images.is_contiguous()
    assert tuple(data.images.shape) == images.shape
    assert np.array_equal(data.images.numpy(), images)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels
    assert data.classes == classes


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """CIFAR spec: 1024 red, then green, then blue values; each plane row-major (32 values per row)."""
    n = len(images)
    rows = np.zeros((n, 3072), dtype=np.uint8)
    for ch in range(3):
        for r in range(32):
            rows[:, ch * 1024 + r * 32: ch * 1024 + r * 32 + 32] = images[:, ch, r, :]
    return rows


def dump(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)  # like the official files


# ---------------------------------------------------------------- CIFAR

def make_cifar10_py(root: Path, str_keys: bool = False) -> dict[str, tuple[np.ndarray, list[int]]]:
    k = (lambda s: s) if str_keys else (lambda s: s.encode())
    folder, out = root / "cifar-10-batches-py", {}
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for i, fname in enumerate(names):
        imgs, labels = rand_images(2), [i % 10, (i + 3) % 10]
        dump({k("batch_label"): k(fname), k("labels"): labels, k("data"): cifar_rows(imgs),
              k("filenames"): [k("a.png"), k("b.png")]}, folder / fname)
        out[fname] = (imgs, labels)
    label_names = [f"class{c}" for c in range(10)]
    dump({k("label_names"): [k(n) for n in label_names], k("num_vis"): 3072}, folder / "batches.meta")
    return out


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar10_python(tmp_path: Path, str_keys: bool) -> None:
    written = make_cifar10_py(tmp_path, str_keys)
    ds = cifar.Cifar10(cifar.Cifar10.Options(), tmp_path)
    classes = [f"class{c}" for c in range(10)]
    train = ds.load("train")
    imgs = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    check(train, imgs, labels, classes, "cifar10")
    check(ds.load("test"), *written["test_batch"], classes, "cifar10")


def test_cifar_pixel_orientation(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    rows = np.zeros((1, 3072), dtype=np.uint8)
    rows[0, 1 * 1024 + 3 * 32 + 7] = 200  # green channel, row 3, column 7
    dump({b"data": rows, b"labels": [4]}, folder / "test_batch")
    dump({b"label_names": [str(c).encode() for c in range(10)]}, folder / "batches.meta")
    img = cifar.Cifar10(None, tmp_path).load("test").images
    assert img[0, 1, 3, 7] == 200 and int(img.sum()) == 200


def test_cifar10_binary(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    imgs, labels = rand_images(3), [9, 0, 5]
    rec = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], cifar_rows(imgs)], axis=1)
    rec.tofile(folder / "test_batch.bin")
    (folder / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n\n")
    check(cifar.Cifar10(None, tmp_path).load("test"), imgs, labels, [f"c{i}" for i in range(10)], "cifar10")
    with pytest.raises(UserError, match="data_batch_1.bin"):  # train batches absent: names the file
        cifar.Cifar10(None, tmp_path).load("train")
    (folder / "test_batch.bin").write_bytes(rec.tobytes()[:-10])  # truncated
    with pytest.raises(UserError, match="corrupted"):
        cifar.Cifar10(None, tmp_path).load("test")


def test_cifar100_python_and_binary(tmp_path: Path) -> None:
    imgs, fine, coarse = rand_images(3), [99, 0, 42], [19, 0, 7]
    py = tmp_path / "py" / "cifar-100-python"
    dump({b"data": cifar_rows(imgs), b"fine_labels": fine, b"coarse_labels": coarse}, py / "test")
    dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
          b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, py / "meta")
    binary = tmp_path / "bin" / "cifar-100-binary"
    binary.mkdir(parents=True)
    np.concatenate([np.array([coarse, fine], dtype=np.uint8).T, cifar_rows(imgs)], axis=1).tofile(binary / "test.bin")
    (binary / "fine_label_names.txt").write_text("\n".join(f"f{i}" for i in range(100)))
    (binary / "coarse_label_names.txt").write_text("\n".join(f"s{i}" for i in range(20)))
    for sub in ("py", "bin"):
        root = tmp_path / sub
        check(cifar.Cifar100(cifar.Cifar100.Options(), root).load("test"),
              imgs, fine, [f"f{i}" for i in range(100)], "cifar100")
        opts = validate(cifar.Cifar100.Options, {"labels": "coarse"}, "data")
        check(cifar.Cifar100(opts, root).load("test"), imgs, coarse, [f"s{i}" for i in range(20)], "cifar100")


def test_cifar_truncated_pickle(tmp_path: Path) -> None:
    make_cifar10_py(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="test_batch"):
        cifar.Cifar10(None, tmp_path).load("test")


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_unpickle_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    make_cifar10_py(tmp_path)
    dump({b"data": Evil(marker), b"labels": [0]}, tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(UserError, match="not a valid dataset batch"):
        cifar.Cifar10(None, tmp_path).load("test")
    with pytest.raises(UserError):
        safe_unpickle(tmp_path / "cifar-10-batches-py" / "test_batch")
    assert not marker.exists()


def test_cifar_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    def fail(*args, **kwargs):
        raise RuntimeError("network unreachable\ntraceback-ish detail")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fail)
    with pytest.raises(UserError) as err:
        cifar.Cifar10(None, tmp_path).download()
    assert "network unreachable" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- STL-10

def test_stl10(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    imgs = rand_images(2, 96)
    imgs.transpose(0, 1, 3, 2).tofile(folder / "train_X.bin")  # column-major per channel
    np.array([1, 10], dtype=np.uint8).tofile(folder / "train_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)) + "\n")
    check(stl10.Stl10(None, tmp_path).load("train"), imgs, [0, 9], [f"k{i}" for i in range(10)], "stl10")

    raw = np.zeros(3 * 96 * 96, dtype=np.uint8)
    raw[2 * 9216 + 60 * 96 + 5] = 77  # spec: channel 2, column 60, row 5 (column-major)
    raw.tofile(folder / "unlabeled_X.bin")
    unl = stl10.Stl10(None, tmp_path).load("unlabeled")
    assert unl.images[0, 2, 5, 60] == 77 and int(unl.images.sum()) == 77 and unl.labels.tolist() == [-1]

    (folder / "train_X.bin").write_bytes(imgs.tobytes()[:-1])
    with pytest.raises(UserError, match="truncated"):
        stl10.Stl10(None, tmp_path).load("train")


# ---------------------------------------------------------------- SVHN

def test_svhn(tmp_path: Path) -> None:
    imgs = rand_images(3)
    imgs[1] = 0
    imgs[1, 0, 4, 30] = 123  # red channel, row 4, column 30
    x = np.zeros((32, 32, 3, 3), dtype=np.uint8)
    for n in range(3):
        for ch in range(3):
            x[:, :, ch, n] = imgs[n, ch]  # X[row, col, channel, image]
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [9]], dtype=np.uint8)})
    data = svhn.Svhn(None, tmp_path).load("test")
    check(data, imgs, [0, 1, 9], [str(d) for d in range(10)], "svhn")
    assert data.images[1, 0, 4, 30] == 123
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB 5.0 garbage" * 3)
    with pytest.raises(UserError, match="train_32x32.mat"):
        svhn.Svhn(None, tmp_path).load("train")


# ---------------------------------------------------------------- ImageNet-32

def test_imagenet32_npz_and_pickle(tmp_path: Path) -> None:
    batches = [(rand_images(1), [i + 1]) for i in range(10)]  # labels stored 1..1000
    val_imgs, val_labels = rand_images(2), [1000, 1]
    for fmt in ("npz", "pkl"):
        root = tmp_path / fmt
        train_dir = root / ("Imagenet32_train_npz" if fmt == "npz" else "Imagenet32_train")
        val_dir = root / ("Imagenet32_val_npz" if fmt == "npz" else "Imagenet32_val")
        train_dir.mkdir(parents=True)
        val_dir.mkdir(parents=True)
        for i, (imgs, labels) in enumerate(batches, 1):
            batch = {"data": cifar_rows(imgs), "labels": labels, "mean": np.zeros(3072)}
            if fmt == "npz":
                np.savez(train_dir / f"train_data_batch_{i}.npz", **batch)
            else:
                dump(batch, train_dir / f"train_data_batch_{i}")
        if fmt == "npz":
            np.savez(val_dir / "val_data.npz", data=cifar_rows(val_imgs), labels=val_labels)
        else:
            dump({"data": cifar_rows(val_imgs), "labels": val_labels}, val_dir / "val_data")
        ds = imagenet32.Imagenet32(None, root)
        classes = [str(i) for i in range(1000)]
        check(ds.load("train"), np.concatenate([b[0] for b in batches]), list(range(10)), classes, "imagenet32")
        check(ds.load("val"), val_imgs, [999, 0], classes, "imagenet32")
        check(ds.load("test"), val_imgs, [999, 0], classes, "imagenet32")
    (tmp_path / "npz" / "map_clsloc.txt").write_text("n01 1 tench\nn02 1000 toilet_tissue\n")
    classes = imagenet32.Imagenet32(None, tmp_path / "npz").load("val").classes
    assert classes[0] == "tench" and classes[999] == "toilet_tissue" and classes[1] == "1"


def test_imagenet32_corrupt_npz(tmp_path: Path) -> None:
    folder = tmp_path / "Imagenet32_val_npz"
    folder.mkdir()
    (folder / "val_data.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="val_data.npz"):
        imagenet32.Imagenet32(None, tmp_path).load("val")


# ---------------------------------------------------------------- image folder

def test_image_folder(tmp_path: Path) -> None:
    base = tmp_path / "imgs" / "train"
    cat = RNG.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    cat[2, 6] = (1, 2, 3)  # row 2, column 6
    (base / "cat").mkdir(parents=True)
    (base / "ant").mkdir()
    Image.fromarray(cat).save(base / "cat" / "a.png")
    Image.fromarray(np.full((8, 8), 90, dtype=np.uint8), mode="L").save(base / "ant" / "g.PNG")  # grey → RGB
    (base / "ant" / "notes.txt").write_text("ignored")
    opts = validate(image_folder.ImageFolder.Options, {"path": "imgs", "image_size": 8}, "data")
    data = image_folder.ImageFolder(opts, tmp_path).load("train")
    expected = np.stack([np.full((3, 8, 8), 90, dtype=np.uint8), cat.transpose(2, 0, 1)])
    check(data, expected, [0, 1], ["ant", "cat"], "image_folder")
    assert data.images[1, :, 2, 6].tolist() == [1, 2, 3]

    big = image_folder.ImageFolder(image_folder.ImageFolderOptions(path="imgs", image_size=16), tmp_path).load("train")
    assert tuple(big.images.shape) == (2, 3, 16, 16) and bool((big.images[0] == 90).all())  # bicubic keeps constants

    with pytest.raises(UserError, match="minimum"):
        validate(image_folder.ImageFolder.Options, {"image_size": 4}, "data")
    (base / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="bad.jpg"):
        image_folder.ImageFolder(opts, tmp_path).load("train")


# ---------------------------------------------------------------- digits

def test_digits_split() -> None:
    from sklearn.datasets import load_digits

    ds = digits.Digits(None, Path("/nonexistent"))
    train, test = ds.load("train"), ds.load("test")
    assert (len(train), len(test)) == (1347, 450)
    assert tuple(train.images.shape) == (1347, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.classes == [str(d) for d in range(10)]
    assert int(test.images.min()) == 0 and int(test.images.max()) > 240  # 0..16 scaled to 0..255
    assert torch.equal(train.images[:, 0], train.images[:, 1]) and torch.equal(train.images[:, 0], train.images[:, 2])
    again = ds.load("test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    full = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(test.labels.numpy(), minlength=10)
    assert np.array_equal(np.bincount(train.labels.numpy(), minlength=10) + test_counts, full)
    assert np.all(np.abs(test_counts - full * 0.25) <= 1)  # stratified
    # Upsampling preserves the picture: 4x4 means come back close to the scaled 8x8 originals.
    pooled = torch.nn.functional.avg_pool2d(train.images[:, :1].float(), 4)[:, 0]
    assert float(pooled.mean()) == pytest.approx(load_digits().images.mean() * 255 / 16, rel=0.05)


# ---------------------------------------------------------------- shared behaviour

ALL = [digits.Digits, cifar.Cifar10, cifar.Cifar100, stl10.Stl10, svhn.Svhn, imagenet32.Imagenet32,
       image_folder.ImageFolder]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_unknown_split(cls: type, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"unknown split 'bogus'.*{cls.splits[0]}"):
        cls(cls.Options(), tmp_path).load("bogus")


MISSING = [
    (cifar.Cifar10, "train", "cifar-10-batches-py"),
    (cifar.Cifar100, "test", "cifar-100-python"),
    (stl10.Stl10, "unlabeled", "stl10_binary/unlabeled_X.bin"),
    (svhn.Svhn, "extra", "extra_32x32.mat"),
    (imagenet32.Imagenet32, "train", "Imagenet32_train_npz/train_data_batch_1.npz"),
    (image_folder.ImageFolder, "train", "train"),
]


@pytest.mark.parametrize("cls,split,path", MISSING, ids=[m[0].name for m in MISSING])
def test_missing_files(cls: type, split: str, path: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        cls(cls.Options(), tmp_path).load(split)
    msg = str(err.value)
    assert str((tmp_path / path).resolve()) in msg and "\n" not in msg and msg.startswith(cls.name)


def test_hooks_register_every_dataset() -> None:
    reg = Registry(load_entry_points=False)
    for module in (digits, cifar, stl10, svhn, imagenet32, image_folder):
        reg.register(module)
    assert sorted(reg.entries("dataset")) == sorted(c.name for c in ALL)
