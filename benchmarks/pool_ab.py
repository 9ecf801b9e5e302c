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
from gradfilter.train.cache import _capture, find_prefix, skip_prefix

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import FUSED_CASES, save, step_batch  # noqa: E402


def _case(model: str, last: int, repeats: int) -> dict:
    x, y = step_batch()
    net, opt, names = build(model, "fused", last, 4, x[:2])
    net.train()
    # the frozen prefix runs once: each step starts at the first trainable block (as with
    # --cache-features), so the frozen forward's noise does not bury a sub-millisecond change
    prefix = find_prefix(net, names[0], x[:2])
    feats = _capture(net, names[0], x)
    times: dict[str, list[tuple[float, float]]] = {"pool": [], "map": []}
    try:
        with skip_prefix(net, prefix):
            for i in range(repeats + 3):  # three warm-up rounds are dropped
                for k in (("pool", "map") if i % 2 == 0 else ("map", "pool")):
                    blocks.POOL_IN_FUSED = k == "pool"
                    opt.zero_grad(set_to_none=True)
                    t0 = time.perf_counter()
                    loss = F.cross_entropy(net(feats), y)
                    t1 = time.perf_counter()
                    loss.backward()
                    t2 = time.perf_counter()
                    if i >= 3:
                        times[k].append((t1 - t0, t2 - t1))
                    opt.step()
    finally:
        blocks.POOL_IN_FUSED = True
    row: dict = {"model": model, "last": last}
    for k, v in times.items():
        row[f"forward_ms_{k}"] = round(statistics.median(t[0] for t in v) * 1e3, 2)
        row[f"backward_ms_{k}"] = round(statistics.median(t[1] for t in v) * 1e3, 2)
    saved = [sum(m) - sum(p) for m, p in zip(times["map"], times["pool"])]
    row["step_saved_ms_paired"] = round(statistics.median(saved) * 1e3, 2)
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
        print(f"{r['model']:22s} last {r['last']}: forward {r['forward_ms_map']:.1f} -> "
              f"{r['forward_ms_pool']:.1f} ms, backward {r['backward_ms_map']:.2f} -> "
              f"{r['backward_ms_pool']:.2f} ms, step {r['step_saved_ms_paired']:.2f} ms shorter "
              "(paired; map + PyTorch pooling -> pooled in the fused node)")
    save(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
