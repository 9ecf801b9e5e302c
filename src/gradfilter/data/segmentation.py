"""Segmentation data: ``(3xSxS float image, SxS int64 mask)`` pairs, images normalised with
mean 0.5 / std 0.5 like the classification sets, masks holding class indices and
:data:`IGNORE_INDEX` for pixels that carry no label.

* ``synthetic-seg`` - procedurally generated and seeded: backgrounds and shape fillings are
  random crops of real photographs shipped with scikit-image (BSD-3-Clause), with shapes of four
  classes (disk, square, triangle, cross) at random sizes, positions and rotations, possibly
  overlapping; a one-pixel band on every class border is labelled :data:`IGNORE_INDEX` (as VOC
  does). Backgrounds and fillings come from disjoint photo sets, and every shape class draws its
  filling from the same set, so the class is decided by geometry, not texture.
* ``synthetic-seg-source`` - a different task of the same kind, to pretrain a whole segmentation
  model on before fine-tuning it on ``synthetic-seg`` (the paper's protocol: models trained on
  one segmentation set, fine-tuned on another): five other shape classes (ellipse, star, ring,
  hexagon, crescent), the two photo pools swapped (shapes filled with the target's backgrounds,
  drawn on its fillings) and its own seeds.
* ``voc:PATH`` - Pascal VOC layout: ``PATH/JPEGImages/<id>.jpg``,
  ``PATH/SegmentationClass/<id>.png`` (palette PNGs, 255 = border) and
  ``PATH/ImageSets/Segmentation/{train,val}.txt``; 21 classes.
* ``cityscapes:PATH`` - torchvision's ``Cityscapes`` (fine annotations, ``leftImg8bit`` and
  ``gtFine`` under PATH), label ids mapped to the 19 training classes.

Images are resized to SxS (bilinear) and masks alike (nearest): no crop, so the whole scene is
kept; aspect ratios of on-disk sets are not preserved.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .builtin import MEAN, STD, DatasetSplits

__all__ = [
    "IGNORE_INDEX",
    "SEGMENTATION_KINDS",
    "SOURCE_CLASSES",
    "SYNTHETIC_CLASSES",
    "SegmentationArrays",
    "VOC_CLASSES",
    "get_segmentation_dataset",
    "make_synthetic_seg",
]

IGNORE_INDEX = 255
SEGMENTATION_KINDS = ("synthetic-seg", "synthetic-seg-source", "voc", "cityscapes")
SYNTHETIC_CLASSES = ("background", "disk", "square", "triangle", "cross")
SOURCE_CLASSES = ("background", "ellipse", "star", "ring", "hexagon", "crescent")
SYNTHETIC_SIZES = {"train": 1000, "val": 200}
SYNTHETIC_SEED = 0
SOURCE_SEED = 1000  # synthetic-seg-source: train seed (val: +1), far from the target's
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
# scikit-image's bundled photographs (no download): backgrounds vs shape fillings.
_BACKGROUNDS = ("brick", "grass", "gravel", "camera", "moon", "coffee", "chelsea", "astronaut")
_FILLINGS = ("rocket", "hubble_deep_field", "immunohistochemistry", "retina", "coins", "page")


class SegmentationArrays(Dataset):
    """In-memory images ``(N, 3, S, S)`` in [0, 1] and masks ``(N, S, S)``; normalised per
    item."""

    def __init__(self, images: Tensor, masks: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or masks.shape != (
            images.shape[0], *images.shape[2:]
        ):
            raise ValueError(f"images (N,3,H,W) and masks (N,H,W) expected, got "
                             f"{tuple(images.shape)} and {tuple(masks.shape)}")
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return (self.images[index] - MEAN) / STD, self.masks[index].long()


# ----------------------------------------------------------------------------------------------
# synthetic-seg


@functools.lru_cache(maxsize=4)
def _photos(names: tuple[str, ...], size: int) -> tuple[Tensor, ...]:
    """The named scikit-image photos as 3xHxW floats in [0, 1], short side scaled to 2.5*size."""
    from skimage import data

    out = []
    for name in names:
        img = torch.from_numpy(np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0)
        img = img[..., :3].permute(2, 0, 1) if img.ndim == 3 else img.expand(3, -1, -1)
        scale = 2.5 * size / min(img.shape[-2:])
        hw = [max(size, round(s * scale)) for s in img.shape[-2:]]
        out.append(F.interpolate(img[None], size=hw, mode="bilinear", antialias=True,
                                 align_corners=False)[0].clamp_(0, 1).contiguous())
    return tuple(out)


def _crop(rng: np.random.Generator, photos: tuple[Tensor, ...], size: int) -> Tensor:
    img = photos[rng.integers(len(photos))]
    top = rng.integers(img.shape[1] - size + 1)
    left = rng.integers(img.shape[2] - size + 1)
    patch = img[:, top : top + size, left : left + size]
    if rng.random() < 0.5:
        patch = patch.flip(-1)
    tint = torch.from_numpy(rng.uniform(0.6, 1.4, size=(3, 1, 1)).astype(np.float32))
    return (patch * tint).clamp(0, 1)


def _shape_mask(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """Boolean SxS mask of one shape of class ``cls`` (1 disk, 2 square, 3 triangle, 4 cross)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    radius = rng.uniform(0.15, 0.32) * size
    cy, cx = rng.uniform(radius * 0.6, size - radius * 0.6, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s  # coordinates in the shape's rotated frame
    v = -(xx - cx) * s + (yy - cy) * c
    if cls == 1:
        return u**2 + v**2 <= radius**2
    if cls == 2:
        half = radius / np.sqrt(2) * 1.1
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if cls == 3:  # equilateral triangle: three half-planes at 120 degrees
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= radius * 0.6
        return inside
    arm = radius * 0.35  # cross: two bars
    return ((np.abs(u) <= radius) & (np.abs(v) <= arm)) | ((np.abs(v) <= radius) & (
        np.abs(u) <= arm))


def _source_shape_mask(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """Boolean SxS mask of one ``synthetic-seg-source`` shape (1 ellipse, 2 five-pointed star,
    3 ring, 4 hexagon, 5 crescent); same size, position and rotation law as the target's."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    radius = rng.uniform(0.15, 0.32) * size
    cy, cx = rng.uniform(radius * 0.6, size - radius * 0.6, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    if cls == 1:  # axes ratio 0.45-0.7
        b = radius * rng.uniform(0.45, 0.7)
        return (u / radius) ** 2 + (v / b) ** 2 <= 1
    if cls == 2:  # radius swings between 0.45 r (inner corners) and r (tips), five times
        wave = np.abs(((phi * 5 / (2 * np.pi)) % 1) - 0.5) * 2  # 1 at the tips, 0 between
        return rho <= radius * (0.45 + 0.55 * wave)
    if cls == 3:
        return (rho <= radius) & (rho >= radius * 0.55)
    if cls == 4:  # regular hexagon: six half-planes at 60 degrees
        inside = np.ones_like(u, dtype=bool)
        for k in range(6):
            a = np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= radius * 0.87
        return inside
    # crescent: a disk minus a shifted disk
    return (rho <= radius) & ((u - radius * 0.5) ** 2 + v**2 > (radius * 0.85) ** 2)


def _border(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another class (both sides of every class border)."""
    edge = np.zeros(mask.shape, dtype=bool)
    dv = mask[1:, :] != mask[:-1, :]
    dh = mask[:, 1:] != mask[:, :-1]
    edge[1:, :] |= dv
    edge[:-1, :] |= dv
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    return edge


# The two generated tasks: classes, shape drawer, (background, filling) photo pools, train seed.
_VARIANTS = {
    "synthetic-seg": (SYNTHETIC_CLASSES, _shape_mask, (_BACKGROUNDS, _FILLINGS), SYNTHETIC_SEED),
    "synthetic-seg-source": (SOURCE_CLASSES, _source_shape_mask, (_FILLINGS, _BACKGROUNDS),
                             SOURCE_SEED),
}


@functools.lru_cache(maxsize=8)
def make_synthetic_seg(n: int, size: int, seed: int,
                       variant: str = "synthetic-seg") -> SegmentationArrays:
    """``n`` images of ``size``x``size``: 1-3 shapes each on a photo background; image ``i``
    depends only on (``variant``, ``seed``, ``i``, ``size``). ``variant`` is
    ``synthetic-seg`` or ``synthetic-seg-source`` (other shapes, swapped photo pools)."""
    if size < 16:
        raise ValueError(f"synthetic-seg needs an image size of at least 16, got {size}")
    if variant not in _VARIANTS:
        raise ValueError(f"unknown synthetic variant {variant!r}; known: {', '.join(_VARIANTS)}")
    classes, draw, (bg_names, fill_names), _ = _VARIANTS[variant]
    backgrounds, fillings = _photos(bg_names, size), _photos(fill_names, size)
    images = torch.empty(n, 3, size, size)
    masks = torch.empty(n, size, size, dtype=torch.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, i, size])
        img = _crop(rng, backgrounds, size)
        mask = np.zeros((size, size), dtype=np.uint8)
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.integers(1, len(classes)))
            for _try in range(4):  # keep shapes mostly apart: at most 20 % may be covered
                shape = draw(rng, cls, size)
                if (mask[shape] > 0).mean() <= 0.2:
                    break
            img = torch.where(torch.from_numpy(shape), _crop(rng, fillings, size), img)
            mask[shape] = cls
        mask[_border(mask)] = IGNORE_INDEX
        images[i], masks[i] = img, torch.from_numpy(mask)
    return SegmentationArrays(images, masks)


def _synthetic(image_size: int, split: str, variant: str = "synthetic-seg") -> DatasetSplits:
    classes, _, _, seed = _VARIANTS[variant]

    def part(name: str, offset: int) -> SegmentationArrays | None:
        if split not in (name, "both"):
            return None
        return make_synthetic_seg(SYNTHETIC_SIZES[name], image_size, seed + offset, variant)

    return DatasetSplits(variant, part("train", 0), part("val", 1), len(classes), classes,
                         task="segmentation", ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------
# On-disk sets


def _resize_pair(image, mask: np.ndarray, size: int) -> tuple[Tensor, Tensor]:
    """PIL image and integer mask → normalised 3xSxS image and SxS int64 mask."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    x = F.interpolate(x.permute(2, 0, 1)[None], size=(size, size), mode="bilinear",
                      align_corners=False, antialias=True)[0]
    m = torch.from_numpy(mask.astype(np.int64))[None, None].float()
    m = F.interpolate(m, size=(size, size), mode="nearest")[0, 0].long()
    return (x - MEAN) / STD, m


class VOCSegmentation(Dataset):
    """Pascal VOC segmentation ids listed in ``ImageSets/Segmentation/<split>.txt``."""

    def __init__(self, root: Path, split: str, size: int) -> None:
        ids_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        self.ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
        self.root, self.size = root, size
        missing = [i for i in self.ids if not (root / "JPEGImages" / f"{i}.jpg").is_file()
                   or not (root / "SegmentationClass" / f"{i}.png").is_file()]
        if missing:
            raise FileNotFoundError(
                f"voc:{root}: {len(missing)} ids of {ids_file.name} lack JPEGImages/<id>.jpg or "
                f"SegmentationClass/<id>.png (first: {missing[0]})"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        i = self.ids[index]
        with Image.open(self.root / "JPEGImages" / f"{i}.jpg") as img, Image.open(
            self.root / "SegmentationClass" / f"{i}.png"
        ) as lab:
            mask = np.asarray(lab)  # palette PNG: the indices are the class ids
            return _resize_pair(img, mask, self.size)


def _voc(spec: str, root: Path, image_size: int, split: str) -> DatasetSplits:
    wanted = ("train", "val") if split == "both" else (split,)
    needed = [root / "JPEGImages", root / "SegmentationClass"] + [
        root / "ImageSets" / "Segmentation" / f"{s}.txt" for s in wanted
    ]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{spec}: missing {', '.join(missing)} (Pascal VOC layout: "
                                "JPEGImages, SegmentationClass, ImageSets/Segmentation)")
    parts = {s: VOCSegmentation(root, s, image_size) for s in wanted}
    return DatasetSplits("voc", parts.get("train"), parts.get("val"), len(VOC_CLASSES),
                         VOC_CLASSES, task="segmentation", ignore_index=IGNORE_INDEX)


class _CityscapesPairs(Dataset):
    """torchvision's Cityscapes with label ids mapped to train ids (255 = ignore), resized."""

    def __init__(self, base: Dataset, size: int) -> None:
        self.base, self.size = base, size
        lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
        for c in type(base).classes:
            if 0 <= c.id < 256 and c.train_id not in (-1, 255):
                lut[c.id] = c.train_id
        self.lut = lut

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        img, target = self.base[index]
        return _resize_pair(img, self.lut[np.asarray(target)], self.size)


def _cityscapes(spec: str, root: Path, image_size: int, split: str) -> DatasetSplits:
    from torchvision.datasets import Cityscapes

    wanted = ("train", "val") if split == "both" else (split,)
    missing = [str(root / d / s) for d in ("leftImg8bit", "gtFine") for s in wanted
               if not (root / d / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{spec}: missing {', '.join(missing)} (Cityscapes layout: "
                                "leftImg8bit/<split>, gtFine/<split>)")
    parts = {s: _CityscapesPairs(Cityscapes(str(root), split=s, mode="fine",
                                            target_type="semantic"), image_size)
             for s in wanted}
    classes = tuple(c.name for c in sorted(Cityscapes.classes, key=lambda c: c.train_id)
                    if c.train_id not in (-1, 255))
    return DatasetSplits("cityscapes", parts.get("train"), parts.get("val"), len(classes),
                         classes, task="segmentation", ignore_index=IGNORE_INDEX)


_ON_DISK: dict[str, Callable[[str, Path, int, str], DatasetSplits]] = {
    "voc": _voc, "cityscapes": _cityscapes,
}


def get_segmentation_dataset(spec: str, image_size: int, split: str) -> DatasetSplits:
    """``synthetic-seg``, ``synthetic-seg-source``, ``voc:PATH`` or ``cityscapes:PATH`` at
    ``image_size`` x ``image_size``."""
    kind, sep, arg = spec.partition(":")
    if kind in _VARIANTS and not sep:
        return _synthetic(image_size, split, kind)
    if kind in _ON_DISK:
        if not arg:
            raise ValueError(f"dataset spec '{spec}' needs a path: {kind}:PATH")
        root = Path(arg).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{spec}: missing folder {root}")
        return _ON_DISK[kind](spec, root, image_size, split)
    raise ValueError(f"unknown segmentation dataset spec '{spec}'")
