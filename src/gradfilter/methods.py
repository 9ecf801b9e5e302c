"""The training methods, named the same everywhere (``prepare_model``, the CLI, ``bench step``,
the demo, federated runs). Import-light: the command line reads it before loading torch."""

from __future__ import annotations

__all__ = ["METHODS", "default_lean"]

#: ``vanilla`` plain backprop; ``filtered`` filtered convs (the paper's method); ``lean`` also
#: lean ReLU/BatchNorm layers; ``fused`` also fused blocks (:func:`gradfilter.apply`).
METHODS = ("vanilla", "filtered", "lean", "fused")


def default_lean(method: str) -> str | None:
    """The BatchNorm mode of ``method``'s lean layers unless one is given (None: none)."""
    return "patch" if method in ("lean", "fused") else None
