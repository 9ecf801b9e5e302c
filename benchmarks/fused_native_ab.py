"""Fused blocks with their forward and backward as one native call each against the same steps
as a Python loop over the units calling the native kernels one by one (``blocks.ONE_CALL_NATIVE
= False``, the form before those calls).

One fused model per case (as ``gradfilter bench step`` builds it: last N blocks trained, r=4,
batch 16, 224²); training steps alternate between the two forms (order flipped each round),
medians of the forward (autograd recording included) and the backward.

    .venv/bin/python benchmarks/fused_native_ab.py --out benchmarks/results/fused_native_ab_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch.nn.functional as F

from gradfilter import blocks
from gradfilter.allocator import tune_cpu_allocator
from gradfilter.bench.machine import describe, machine_info
from gradfilter.bench.step import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import FUSED_CASES, save, step_batch  # noqa: E402


def _case(model: str, last: int, repeats: int) -> dict:
    x, y = step_batch()
    net, opt, _ = build(model, "fused", last, 4, x[:2])
    net.train()
    times: dict[str, list[tuple[float, float]]] = {"one_call": [], "loop": []}
    try:
        for i in range(repeats + 3):  # three warm-up rounds are dropped
            for k in (("one_call", "loop") if i % 2 == 0 else ("loop", "one_call")):
                blocks.ONE_CALL_NATIVE = k == "one_call"
                opt.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss = F.cross_entropy(net(x), y)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                if i >= 3:
                    times[k].append((t1 - t0, t2 - t1))
                opt.step()
    finally:
        blocks.ONE_CALL_NATIVE = True
    row: dict = {"model": model, "last": last}
    for k, v in times.items():
        row[f"forward_ms_{k}"] = round(statistics.median(t[0] for t in v) * 1e3, 2)
        row[f"backward_ms_{k}"] = round(statistics.median(t[1] for t in v) * 1e3, 2)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tune_cpu_allocator()
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
