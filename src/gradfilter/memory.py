"""Measure what autograd saves for backward (``saved_tensors_hooks``), deduplicated by storage."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["SavedTensors", "count_saved"]


@dataclass
class SavedTensors:
    """Storages saved for backward while the context was open (parameters excluded if asked)."""

    storages: dict[int, int] = field(default_factory=dict)  # data_ptr -> bytes
    count: int = 0

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


@contextmanager
def count_saved(exclude: Iterable[Tensor] = ()):
    """Count the bytes of every distinct storage autograd saves inside the block.

    Pass a model's parameters as ``exclude`` to count activations only (weights live anyway).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved = SavedTensors()

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        saved.count += 1
        if ptr not in skip and ptr not in saved.storages:
            saved.storages[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved
