"""Benchmarks: vanilla and filtered in the same process, alternating, reported as ratios."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import write_json_atomic


def save_result(result: dict[str, Any], out: str | Path,
                plot: Callable[[dict[str, Any], Path], Any]) -> Path:
    """``result`` as JSON at ``out`` (atomically) and ``plot``'s PNG beside it; without
    matplotlib (the ``plot`` extra) the PNG is skipped with a note, any other error raises."""
    path = write_json_atomic(result, out)
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib not installed: no plot written")
    else:
        plot(result, path.with_suffix(".png"))
    return path
