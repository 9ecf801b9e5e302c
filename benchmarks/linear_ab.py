"""The fused method's classifier with its native forward and one-pass backward
(``gradfilter.fuse_linear``) against ``nn.Linear``'s own (``gradfilter.linear.NATIVE = False``),
in training steps.

One fused model per case (as ``gradfilter bench step`` builds it: last N blocks trained, r=4,
batch 16, 224², ResNet18's blocks lean); the frozen prefix runs once and each step starts at
the first trained block (its noise would bury a sub-millisecond change); steps alternate
between the two forms (order flipped each round): medians of the forward and backward, and
their median per-round differences.

    .venv/bin/python benchmarks/linear_ab.py --out benchmarks/results/linear_ab_cpu.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from gradfilter import linear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import FUSED_CASES, flag_ab_main  # noqa: E402

CASES = [*FUSED_CASES, ("resnet18", 4), ("resnet18", 8)]

if __name__ == "__main__":
    raise SystemExit(flag_ab_main(__doc__, linear, "NATIVE", "aten", "native",
                                  "nn.Linear -> native", cases=CASES))
