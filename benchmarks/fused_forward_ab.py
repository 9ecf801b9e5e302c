"""A fused model's training forward with this tree's stats pass against an earlier commit's, in
one process, alternating (order flipped each round): the whole forward (autograd recording
included) of MobileNetV2's and EfficientNet-Lite0's last 4 / last 8 fused blocks, batch 16, 224²,
r=4, and the no-grad forward for scale.

It measures what a per-op micro-benchmark cannot: the pass's effect on the ops around it (the
next conv reads the y the pass wrote, from whichever core's cache holds it).

    .venv/bin/python benchmarks/fused_forward_ab.py --baseline 0ff0a22 \\
        --out benchmarks/results/fused_forward_ab_cpu.json
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gradfilter import native
from gradfilter.bench.machine import describe, machine_info
from gradfilter.bench.step import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import FUSED_CASES, parse_args, save, step_batch  # noqa: E402
from stats_ab import _baseline_ops  # noqa: E402


def _case(model: str, last: int, repeats: int, base) -> dict:
    x, y = step_batch()
    net = build(model, "fused", last, 4, x[:2])[0].train()
    ops = {"stats": native.bn_act_stats, "base": base}
    times: dict[str, list[float]] = {"stats": [], "base": [], "no_grad": []}
    try:
        for i in range(repeats + 2):  # two warm-up rounds are dropped
            for k in (("stats", "base") if i % 2 == 0 else ("base", "stats")):
                native.bn_act_stats = ops[k]  # what blocks._unit_stats calls
                t0 = time.perf_counter()
                loss = F.cross_entropy(net(x), y)
                times[k].append(time.perf_counter() - t0)
                del loss
            t0 = time.perf_counter()
            with torch.no_grad():
                net(x)
            times["no_grad"].append(time.perf_counter() - t0)
    finally:
        native.bn_act_stats = ops["stats"]
    times = {k: v[2:] for k, v in times.items()}
    ms = {f"{k}_ms": round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
    paired = [b - s for b, s in zip(times["base"], times["stats"])]
    return {"model": model, "last": last, **ms,
            "base_minus_stats_paired_ms": round(statistics.median(paired) * 1e3, 2)}


def main() -> int:
    args = parse_args(__doc__, (("--baseline",), {
        "required": True, "help": "git revision whose stats pass to compare"}))
    with native.use_native(True):
        base = _baseline_ops(args.baseline)
        rows = [_case(m, last, args.repeats, base) for m, last in FUSED_CASES]
    print(describe(machine_info()))
    for r in rows:
        print(f"{r['model']:22s} last {r['last']}: no-grad {r['no_grad_ms']:.1f} ms | forward "
              f"with {args.baseline}'s pass {r['base_ms']:.1f} ms, with this tree's "
              f"{r['stats_ms']:.1f} ms (paired: {r['base_minus_stats_paired_ms']:+.2f} ms)")
    save(args.out, rows, baseline=args.baseline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
