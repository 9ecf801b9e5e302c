"""Choosing modules by name, and one traced forward: shared by the conversion verbs.

Every verb selects modules by qualified name or glob (:func:`match`), refuses what it cannot
convert in one way (:class:`Refusals`), and leaves each module's train/eval mode as it found it
(:func:`trace` restores them after its eval-mode forward).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["Refusals", "call", "match", "trace"]


def match(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` is one of ``patterns`` or matches one as a glob."""
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def call(model: nn.Module, example_input: Any) -> Any:
    """``model(example_input)``; a mapping is passed as keywords, a tuple or list as arguments."""
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def trace(model: nn.Module, modules: dict[str, nn.Module],
          example_input: Any) -> dict[str, tuple]:
    """One no-grad eval-mode forward; ``{name: (input shape, output shape, input dtype)}`` of the
    given modules in call order. Every module's train/eval mode is restored afterwards."""
    seen: dict[str, tuple] = {}
    handles = []
    for name, mod in modules.items():
        def hook(m, args, out, name=name):
            if name not in seen:
                seen[name] = (tuple(args[0].shape), tuple(out.shape), args[0].dtype)
        handles.append(mod.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            call(model, example_input)
    finally:  # the flags themselves: a train() that freeze pinned stays pinned
        for m, mode in modes.items():
            m.training = mode
        for h in handles:
            h.remove()
    return seen


class Refusals:
    """What a fusing verb could not fuse: a module named exactly raises at once with the reason
    (``on_unsupported="error"``) or is noted (``"skip"``); one matched by a glob only is passed
    over silently. ``nothing_fused`` is the error when no module fused."""

    def __init__(self, caller: str, what: str, names: str | Iterable[str],
                 on_unsupported: str) -> None:
        if on_unsupported not in ("error", "skip"):
            raise ValueError(f"on_unsupported must be 'error' or 'skip', got {on_unsupported!r}")
        self.caller, self.what, self.on_unsupported = caller, what, on_unsupported
        self.patterns = [names] if isinstance(names, str) else list(names)
        self.noted: list[str] = []

    def refuse(self, name: str, why: str) -> None:
        if name not in self.patterns:
            return
        if self.on_unsupported == "error":
            raise ValueError(f"cannot fuse {name}: {why}")
        self.noted.append(f"{name}: {why}")

    def nothing_fused(self) -> ValueError:
        why = "".join(f"\n  {r}" for r in self.noted)
        return ValueError(f"{self.caller}: no {self.what} matching {self.patterns} can be "
                          f"fused{why}")
