"""Measure what autograd saves for backward (``saved_tensors_hooks``), deduplicated by storage,
in total and per module."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SavedTensors", "count_saved"]


@dataclass
class SavedTensors:
    """Storages saved for backward while the context was open (parameters excluded if asked)."""

    storages: dict[int, int] = field(default_factory=dict)  # data_ptr -> bytes
    count: int = 0
    owner: dict[int, str] = field(default_factory=dict)  # data_ptr -> innermost module name

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def bytes_under(self, prefixes: Iterable[str]) -> int:
        """Bytes first saved while a module named in ``prefixes`` (or one of its submodules)
        ran; needs ``count_saved(model=...)``."""
        prefixes = tuple(prefixes)
        dotted = tuple(f"{p}." for p in prefixes)
        return sum(n for ptr, n in self.storages.items()
                   if self.owner.get(ptr, "") in prefixes
                   or self.owner.get(ptr, "").startswith(dotted))


@contextmanager
def count_saved(exclude: Iterable[Tensor] = (), model: nn.Module | None = None):
    """Count the bytes of every distinct storage autograd saves inside the block.

    Pass a model's parameters as ``exclude`` to count activations only (weights live anyway).
    With ``model``, each storage is also attributed to the innermost module of ``model`` that
    was running when it was first saved (see :meth:`SavedTensors.bytes_under`).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved = SavedTensors()
    stack: list[str] = []

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        saved.count += 1
        if ptr not in skip and ptr not in saved.storages:
            saved.storages[ptr] = storage.nbytes()
            saved.owner[ptr] = stack[-1] if stack else ""
        return t

    def enter(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append(name)
        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    handles = []
    if model is not None:
        for name, mod in model.named_modules():
            handles.append(mod.register_forward_pre_hook(enter(name)))
            handles.append(mod.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield saved
    finally:
        for h in handles:
            h.remove()
