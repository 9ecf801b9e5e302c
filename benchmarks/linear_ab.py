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

CASES = [*FUSED_CASES, ("resnet18", 4), ("resnet18", 8)]


def _case(model: str, last: int, repeats: int) -> dict:
    times = fused_flag_steps(model, last, repeats, linear, "NATIVE", cached=True, aten=False,
                             native=True)
    return {"model": model, "last": last, **phase_medians(times),
            **paired_differences(times, "aten", "native")}


def main() -> int:
    args = parse_args(__doc__)
    rows = [_case(m, last, args.repeats) for m, last in CASES]
    print(describe(machine_info()))
    for r in rows:
        print(f"{r['model']:22s} last {r['last']}: forward {r['forward_ms_aten']:.2f} -> "
              f"{r['forward_ms_native']:.2f} ms (paired {r['forward_saved_ms_paired']:.2f} ms "
              f"saved), backward {r['backward_ms_aten']:.2f} -> {r['backward_ms_native']:.2f} ms "
              f"(paired {r['backward_saved_ms_paired']:.2f} ms saved; nn.Linear -> native)")
    save(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
