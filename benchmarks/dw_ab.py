"""Fused blocks' depthwise units computing their conv inside their statistics pass (the native
forward on tiny maps) against calling ``conv2d`` and reading its output back
(``native.set_fused_dw(False)``), in training steps.

One fused model per case (as ``gradfilter bench step`` builds it: last N blocks trained, r=4,
batch 16, 224²); the frozen prefix runs once and each step starts at the first trained block;
steps alternate between the two forms (order flipped each round): medians of the forward and
backward and their median per-round differences.

    .venv/bin/python benchmarks/dw_ab.py --out benchmarks/results/dw_ab_cpu.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from gradfilter import native

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import NativeSwitch, flag_ab_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(flag_ab_main(
        __doc__, NativeSwitch(native.set_fused_dw), "enabled", "conv2d", "in_stats",
        "conv2d then the stats pass -> the conv inside it", counter=native.fused_dw_passes))
