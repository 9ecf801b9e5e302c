"""A/B of EfficientNet's fused head (conv_head → bn2 as one fused unit) inside a real step.

Builds EfficientNet-Lite0 as `gradfilter bench step --method fused` does (lean + fused blocks,
head included), deep-copies it twice and turns the head fusion off in one copy; the copies
alternate (order flipped every round) so both see the same machine state. Reports the median
forward and backward time and the bytes saved for backward per step (whole model).

    .venv/bin/python benchmarks/head_ab.py --out benchmarks/results/head_ab_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gradfilter import count_saved
from gradfilter.allocator import tune_cpu_allocator
from gradfilter.bench.machine import describe, machine_info
from gradfilter.bench.step import build
from gradfilter.blocks import FusedHeadMixin


def _case(last: int, repeats: int, batch: int, radius: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    base = build("tf_efficientnet_lite0", "fused", last, radius, x[:2])[0]
    assert isinstance(base, FusedHeadMixin), "the head was not fused"
    nets = {"head fused": copy.deepcopy(base), "head per layer": copy.deepcopy(base)}
    off = nets["head per layer"]
    off.__class__ = off._gradfilter_original_class  # timm's own forward_features
    saved = {}
    for name, net in nets.items():
        net.train()
        with count_saved(net.parameters()) as s:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        saved[name] = s.bytes
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in nets}
    for i in range(repeats + 2):
        for name in (list(nets) if i % 2 else list(nets)[::-1]):
            net = nets[name]
            net.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = F.cross_entropy(net(x), y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            if i >= 2:
                times[name].append((t1 - t0, t2 - t1))
    row: dict = {"model": "tf_efficientnet_lite0", "last": last, "radius": radius, "batch": batch}
    for name, ts in times.items():
        key = name.replace(" ", "_")
        row[f"forward_ms_{key}"] = statistics.median(t[0] for t in ts) * 1e3
        row[f"backward_ms_{key}"] = statistics.median(t[1] for t in ts) * 1e3
        row[f"saved_bytes_{key}"] = saved[name]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--last", default="4,8")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--radius", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tune_cpu_allocator()
    rows = []
    for last in (int(n) for n in args.last.split(",")):
        row = _case(last, args.repeats, args.batch, args.radius)
        rows.append(row)
        print(f"Lite0 last {last}: forward {row['forward_ms_head_per_layer']:.1f} → "
              f"{row['forward_ms_head_fused']:.1f} ms, backward "
              f"{row['backward_ms_head_per_layer']:.1f} → {row['backward_ms_head_fused']:.1f} ms, "
              f"saved per step {row['saved_bytes_head_per_layer'] / 2**20:.1f} → "
              f"{row['saved_bytes_head_fused'] / 2**20:.1f} MiB")
    machine = machine_info()
    print("machine:", describe(machine))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "repeats": args.repeats,
                                              "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
