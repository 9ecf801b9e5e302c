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
from gradfilter.bench.machine import describe, machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import (  # noqa: E402
    FUSED_CASES,
    NativeSwitch,
    fused_flag_steps,
    paired_differences,
    parse_args,
    phase_medians,
    save,
)


def _case(model: str, last: int, repeats: int) -> dict:
    before = native.fused_dw_passes()
    times = fused_flag_steps(model, last, repeats, NativeSwitch(native.set_fused_dw), "enabled",
                             cached=True, conv2d=False, in_stats=True)
    return {"model": model, "last": last, "dw_passes": native.fused_dw_passes() - before,
            **phase_medians(times), **paired_differences(times, "conv2d", "in_stats")}


def main() -> int:
    args = parse_args(__doc__)
    rows = [_case(m, last, args.repeats) for m, last in FUSED_CASES]
    print(describe(machine_info()))
    for r in rows:
        print(f"{r['model']:22s} last {r['last']}: forward {r['forward_ms_conv2d']:.2f} -> "
              f"{r['forward_ms_in_stats']:.2f} ms (paired {r['forward_saved_ms_paired']:.2f} ms "
              f"saved; conv2d then the stats pass -> the conv inside it; "
              f"{r['dw_passes']} such passes)")
    save(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
