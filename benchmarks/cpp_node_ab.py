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
from gradfilter.bench.machine import describe, machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import (  # noqa: E402
    FUSED_CASES,
    fused_flag_steps,
    paired_differences,
    parse_args,
    phase_medians,
    save,
)


def _case(model: str, last: int, repeats: int) -> dict:
    times = fused_flag_steps(model, last, repeats, blocks, "CPP_NODE", cpp=True, python=False)
    return {"model": model, "last": last, **phase_medians(times),
            **paired_differences(times, "python", "cpp")}


def main() -> int:
    args = parse_args(__doc__)
    rows = [_case(m, last, args.repeats) for m, last in FUSED_CASES]
    print(describe(machine_info()))
    for r in rows:
        print(f"{r['model']:22s} last {r['last']}: forward {r['forward_ms_python']:.1f} -> "
              f"{r['forward_ms_cpp']:.1f} ms (paired {r['forward_saved_ms_paired']:+.2f} ms "
              f"saved), backward {r['backward_ms_python']:.2f} -> {r['backward_ms_cpp']:.2f} ms "
              f"(paired {r['backward_saved_ms_paired']:+.2f} ms saved) (Python node -> C++ node)")
    save(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
