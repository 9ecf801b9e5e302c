"""On-device runtimes that run gradfilter's training step outside PyTorch.

:mod:`gradfilter.runtime.executorch` exports the filtered training step (forward, loss and the
filtered backward of the trainable parameters) to an ExecuTorch program and trains with it in
the ExecuTorch runtime. It needs the ``executorch`` extra; nothing else in gradfilter imports
it, and this package imports it only when a function below is called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RUNTIMES", "export_training", "load_training"]

#: Runtimes ``gradfilter finetune --runtime`` accepts besides eager PyTorch.
RUNTIMES = ("executorch",)


def export_training(*args: Any, **kwargs: Any) -> Any:
    """:func:`gradfilter.runtime.executorch.export_training` (imports ExecuTorch)."""
    from .executorch import export_training as impl

    return impl(*args, **kwargs)


def load_training(*args: Any, **kwargs: Any) -> Any:
    """:func:`gradfilter.runtime.executorch.load_training` (imports ExecuTorch)."""
    from .executorch import load_training as impl

    return impl(*args, **kwargs)
