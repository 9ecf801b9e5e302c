"""Fused heads that pool inside the fused node (``FusedHeadMixin`` / ``FusedPoolMixin``) against
the same fused models keeping the map and PyTorch's global average pooling
(``blocks.POOL_IN_FUSED = False``, the form before).

One fused model per case (as ``gradfilter bench step`` builds it: last N blocks trained, r=4,
batch 16, 224²), fed the cached input of its first trainable block (the frozen prefix runs
once); training steps alternate between the two forms (order flipped each round): medians of
the forward of the trainable part (autograd recording included) and the backward, and the
median of the per-round differences (forward + backward, optimizer excluded).

    .venv/bin/python benchmarks/pool_ab.py --out benchmarks/results/pool_ab_cpu.json
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from gradfilter import blocks
from gradfilter.bench.machine import describe, machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import FUSED_CASES, fused_flag_steps, parse_args, phase_medians, save  # noqa: E402


def _case(model: str, last: int, repeats: int) -> dict:
    times = fused_flag_steps(model, last, repeats, blocks, "POOL_IN_FUSED", cached=True,
                             pool=True, map=False)
    saved = [sum(m) - sum(p) for m, p in zip(times["map"], times["pool"])]
    return {"model": model, "last": last, **phase_medians(times),
            "step_saved_ms_paired": round(statistics.median(saved) * 1e3, 2)}


def main() -> int:
    args = parse_args(__doc__)
    rows = [_case(m, last, args.repeats) for m, last in FUSED_CASES]
    print(describe(machine_info()))
    for r in rows:
        print(f"{r['model']:22s} last {r['last']}: forward {r['forward_ms_map']:.1f} -> "
              f"{r['forward_ms_pool']:.1f} ms, backward {r['backward_ms_map']:.2f} -> "
              f"{r['backward_ms_pool']:.2f} ms, step {r['step_saved_ms_paired']:.2f} ms shorter "
              "(paired; map + PyTorch pooling -> pooled in the fused node)")
    save(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
