"""Fused blocks taking their input's patch sums from the fused block before them (the native
forward's hand-off) against summing their input map (``native.set_fused_hand_off(False)``), in
training steps.

One fused model per case (as ``gradfilter bench step`` builds it: last N blocks trained, r=4,
batch 16, 224²); the frozen prefix runs once and each step starts at the first trained block;
steps alternate between the two forms (order flipped each round): medians of the forward and
backward and their median per-round differences.

    .venv/bin/python benchmarks/hand_off_ab.py --out benchmarks/results/hand_off_ab_cpu.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from gradfilter import native

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import NativeSwitch, flag_ab_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(flag_ab_main(
        __doc__, NativeSwitch(native.set_fused_hand_off), "enabled", "summed", "handed",
        "each block sums its input -> handed its sums", counter=native.fused_hand_offs))
