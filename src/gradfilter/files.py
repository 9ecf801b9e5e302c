"""Files that survive a kill and load safely: atomic writes, ``weights_only`` reads."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["load_weights_only", "save_atomic", "write_atomic", "write_json_atomic"]


def _chmod_default(path: str | Path) -> None:
    """Give a ``mkstemp`` file (created 0600) the mode a plain ``open()`` would: 0666 less the
    umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` atomically: ``write`` fills a temp file in the same folder, which is
    fsynced and renamed over ``path``; then the folder is fsynced so the rename is durable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _chmod_default(tmp)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open folders
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (a kill leaves the old file or the new one)."""
    return write_atomic(path, lambda f: torch.save(obj, f))


def write_json_atomic(obj: Any, path: str | Path) -> Path:
    """``obj`` as indented JSON at ``path``, written atomically."""
    data = (json.dumps(obj, indent=2) + "\n").encode("utf-8")
    return write_atomic(path, lambda f: f.write(data))


def load_weights_only(path: str | Path, what: str = "file", remedy: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that cannot be read that way
    (truncated, not a PyTorch file, or holding arbitrary objects) is one ``ValueError`` naming
    the file and the cause, without PyTorch's advice to load it unsafely."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and weights_only errors
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        if not zipfile.is_zipfile(path):
            first = "not a file torch.save wrote"
        elif "Weights only load failed" in first:
            first = "it holds objects other than tensors and plain containers"
        tail = f"; {remedy}" if remedy else ""
        raise ValueError(f"{what} {path} is corrupt or not a PyTorch weights file "
                         f"({type(exc).__name__}: {first}){tail}") from None
