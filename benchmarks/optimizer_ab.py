"""PyTorch's default (for-each) optimizer step against its fused one-kernel step on the trainable
parameters of the step benchmark's cases (``gradfilter bench step``): SGD with momentum, as the
benchmark and the trainer's default take it, and AdamW. One process, alternating, median.

    .venv/bin/python benchmarks/optimizer_ab.py --out benchmarks/results/optimizer_ab_cpu.json
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from gradfilter.bench.machine import describe, machine_info
from gradfilter.bench.step import LAST, MODELS, build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import parse_args, save  # noqa: E402


def _case(model: str, last: int, repeats: int) -> dict:
    net = build(model, "vanilla", last, 4, torch.randn(2, 3, 224, 224))[0]
    params = [p for p in net.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    row: dict = {"model": model, "last": last, "params": sum(p.numel() for p in params)}
    for name, cls, kw in (("sgd", torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
                          ("adamw", torch.optim.AdamW, {"lr": 1e-3})):
        opts = {impl: cls(params, **kw, **{impl: True}) for impl in ("foreach", "fused")}
        times: dict[str, list[float]] = {k: [] for k in opts}
        for i in range(repeats + 3):  # three warm-up rounds (state allocation) are dropped
            for k in (("foreach", "fused") if i % 2 == 0 else ("fused", "foreach")):
                t0 = time.perf_counter()
                opts[k].step()
                if i >= 3:
                    times[k].append(time.perf_counter() - t0)
        for k, v in times.items():
            row[f"{name}_{k}_ms"] = round(statistics.median(v) * 1e3, 3)
    return row


def main() -> int:
    args = parse_args(__doc__)
    rows = [_case(m, last, args.repeats) for m in MODELS for last in LAST]
    print(describe(machine_info()))
    for r in rows:
        print(f"{r['model']:22s} last {r['last']} ({r['params'] / 1e6:.1f}M params): SGD "
              f"{r['sgd_foreach_ms']:.2f} -> {r['sgd_fused_ms']:.2f} ms, AdamW "
              f"{r['adamw_foreach_ms']:.2f} -> {r['adamw_fused_ms']:.2f} ms (for-each -> fused)")
    save(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
