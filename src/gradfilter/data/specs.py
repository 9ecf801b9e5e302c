"""``get_dataset``: one data-set spec string to its train/val splits, for every task."""

from __future__ import annotations

from .builtin import SPLITS, DatasetSplits, get_classification_dataset
from .segmentation import SEGMENTATION_KINDS, get_segmentation_dataset

__all__ = ["get_dataset"]


def get_dataset(spec: str, image_size: int = 64, split: str = "both") -> DatasetSplits:
    """Parse ``spec`` (``digits``, ``mnist5k``, ``lfw_faces``, ``imagefolder:PATH``,
    ``cifar10:PATH``, ``cifar100:PATH``; segmentation: ``synthetic-seg[-source]``, ``voc:PATH``,
    ``cityscapes:PATH``, see :mod:`.segmentation`) and build its ``split`` ("train", "val" or
    "both") at ``image_size`` x ``image_size``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if spec.partition(":")[0] in SEGMENTATION_KINDS:
        return get_segmentation_dataset(spec, image_size, split)
    return get_classification_dataset(spec, image_size, split)
