"""Training checkpoints that survive a kill and load with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain Python containers only: the model's state_dict,
the optimizer's and scheduler's state dicts, the number of epochs done, the metric history, the
RNG states (as uint8/int64 tensors) and the run's config. It is written atomically: to a
temporary file in the same folder, flushed and fsynced, then renamed over the old one, so a
crash leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import load_weights_only

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT_VERSION",
    "get_rng_state",
    "load_training_checkpoint",
    "set_rng_state",
]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1
_REQUIRED = ("format", "epoch", "model", "optimizer", "rng", "config", "history")


def get_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python, NumPy and torch (CPU, CUDA, and ``generator``'s) RNG states, as tensors."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": torch.tensor([version, *words], dtype=torch.int64),
        "python_gauss": None if gauss is None else torch.tensor(gauss, dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_cached": torch.tensor(cached, dtype=torch.float64),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state() if generator is not None else None,
    }
    if kind != "MT19937":  # the only kind np.random.get_state() returns today
        raise ValueError(f"unsupported NumPy RNG kind {kind!r}")
    return state


def set_rng_state(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`get_rng_state` captured."""
    py = state["python"].tolist()
    gauss = state.get("python_gauss")
    random.setstate((int(py[0]), tuple(int(w) for w in py[1:]),
                     None if gauss is None else float(gauss)))
    pos, has_gauss = (int(v) for v in state["numpy_pos"].tolist())
    np.random.set_state((
        "MT19937",
        state["numpy_keys"].numpy().astype(np.uint32),
        pos,
        has_gauss,
        float(state["numpy_cached"]),
    ))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by ``gradfilter finetune`` with ``weights_only=True``.

    A missing file is a ``FileNotFoundError``; an unreadable, truncated or foreign file is a
    ``ValueError``; both name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = load_weights_only(path, "checkpoint", "delete it to start over")
    if not isinstance(ckpt, Mapping) or any(k not in ckpt for k in _REQUIRED):
        raise ValueError(
            f"checkpoint {path} is not a gradfilter training checkpoint "
            f"(expected keys {', '.join(_REQUIRED)})"
        )
    if ckpt["format"] != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format {ckpt['format']!r}, this version reads "
            f"{FORMAT_VERSION}"
        )
    return dict(ckpt)
