"""Fused blocks recording a C++ autograd node (``native.fused_block``, ``blocks.CPP_NODE``)
against the Python autograd Function around the same two native calls (``CPP_NODE = False``,
the form before).

One fused model per case (as ``gradfilter bench step`` builds it: last N blocks trained, r=4,
batch 16, 224²); training steps alternate between the two forms (order flipped each round):
medians of the forward (autograd recording included) and the backward, and the per-round
paired differences (Python node − C++ node).

    .venv/bin/python benchmarks/cpp_node_ab.py --out benchmarks/results/cpp_node_ab_cpu.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from gradfilter import blocks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import flag_ab_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(flag_ab_main(__doc__, blocks, "CPP_NODE", "python", "cpp",
                                  "Python node -> C++ node", cached=False))
