"""Fused blocks with their forward and backward as one native call each against the same steps
as a Python loop over the units calling the native kernels one by one (``blocks.ONE_CALL_NATIVE
= False``, the form before those calls).

One fused model per case (as ``gradfilter bench step`` builds it: last N blocks trained, r=4,
batch 16, 224²); training steps alternate between the two forms (order flipped each round),
medians of the forward (autograd recording included) and the backward.

    .venv/bin/python benchmarks/fused_native_ab.py --out benchmarks/results/fused_native_ab_cpu.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from gradfilter import blocks
from gradfilter.bench.machine import describe, machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import FUSED_CASES, fused_flag_steps, parse_args, phase_medians, save  # noqa: E402


def _case(model: str, last: int, repeats: int) -> dict:
    times = fused_flag_steps(model, last, repeats, blocks, "ONE_CALL_NATIVE", one_call=True,
                             loop=False)
    return {"model": model, "last": last, **phase_medians(times)}


def main() -> int:
    args = parse_args(__doc__)
    rows = [_case(m, last, args.repeats) for m, last in FUSED_CASES]
    print(describe(machine_info()))
    for r in rows:
        print(f"{r['model']:22s} last {r['last']}: forward {r['forward_ms_loop']:.1f} -> "
              f"{r['forward_ms_one_call']:.1f} ms, backward {r['backward_ms_loop']:.2f} -> "
              f"{r['backward_ms_one_call']:.2f} ms (Python unit loop -> one native call)")
    save(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
