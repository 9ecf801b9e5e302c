"""Where the filtered backward's time goes: the floor of docs/spec.md measured on this machine.

For each per-layer config, times (median of repeats) the unavoidable parts of a filtered backward
with plain PyTorch ops: one read of gy and one full-size write of gx (an allocation plus a fill;
page faults included when the allocator is not tuned), the two products at patch resolution
(the faster of MKL's GEMMs and oneDNN's 1×1 conv backward), and one read of W plus a write of
gW. Their sum is the floor for any implementation built from PyTorch ops on this machine. Each
part is timed hot (repeated on the same tensors); the ``*_cold`` figures time the read of gy and
the write of gx after evicting the caches, as inside a backward that follows other work.

    python benchmarks/reproduce/layer_floor.py --out benchmarks/results/layer_floor_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gradfilter.allocator import tune_cpu_allocator
from gradfilter.bench.layers import CONFIGS
from gradfilter.machine import machine_info


def _evict_caches() -> None:
    """Write 64 MiB (twice this CPU's L3) so that the next op finds nothing in the caches."""
    torch.empty(16 << 20).fill_(0.0)


def _median_ms(fn, repeats: int, cold: bool = False) -> float:
    fn()
    fn()
    ts = []
    for _ in range(repeats):
        if cold:
            _evict_caches()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def floor(c: int, h: int, w: int, r: int, n: int, repeats: int) -> dict:
    gy = torch.randn(n, c, h, w)
    p = -(-h // r) * -(-w // r)
    g_small = torch.randn(c, n * p)
    x_small = torch.randn(c, n * p)
    w_mat = torch.randn(c, c)
    weight = torch.randn(c, c, 3, 3)
    g_map = g_small.view(c, n, p).transpose(0, 1).reshape(n, c, p, 1).contiguous()
    x_map = x_small.view(c, n, p).transpose(0, 1).reshape(n, c, p, 1).contiguous()
    w_map = w_mat.view(c, c, 1, 1)
    mkl_ms = _median_ms(lambda: (w_mat @ g_small, g_small @ x_small.t()), repeats)
    onednn_ms = _median_ms(lambda: torch.ops.aten.convolution_backward(
        g_map, x_map, w_map, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [True, True, False]), repeats)
    parts = {
        "read_gy_ms": _median_ms(lambda: gy.sum(), repeats),
        "write_gx_ms": _median_ms(lambda: torch.empty_like(gy).fill_(1.0), repeats),
        "gemms_ms": min(mkl_ms, onednn_ms),
        "weight_ms": _median_ms(lambda: (weight.sum(), torch.empty_like(weight).fill_(1.0)),
                                repeats),
    }
    parts["floor_ms"] = sum(parts.values())
    # the same reads and writes from and to DRAM, as inside a backward that follows other work
    cold = {"read_gy_cold_ms": _median_ms(lambda: gy.sum(), repeats, cold=True),
            "write_gx_cold_ms": _median_ms(lambda: torch.empty_like(gy).fill_(1.0), repeats,
                                           cold=True)}
    cold["floor_cold_ms"] = parts["floor_ms"] - parts["read_gy_ms"] - parts["write_gx_ms"] + \
        cold["read_gy_cold_ms"] + cold["write_gx_cold_ms"]
    return {"channels": c, "height": h, "width": w, "radius": r, **parts, **cold,
            "gemms_mkl_ms": mkl_ms, "gemms_onednn_ms": onednn_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--radii", default="2,4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--layers", default="benchmarks/results/layers_cpu.json",
                    help="per-layer result to compare against (gradfilter bench layers)")
    ap.add_argument("--allocator", choices=["tuned", "default"], default="tuned",
                    help="as `gradfilter --allocator` (the per-layer benchmark's default: tuned)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.allocator == "tuned":
        tune_cpu_allocator()
    measured = {}
    if Path(args.layers).exists():
        for row in json.loads(Path(args.layers).read_text())["rows"]:
            key = (row["channels"], row["height"], row["width"], row["radius"])
            measured[key] = row
    rows = []
    for r in (int(x) for x in args.radii.split(",")):
        for c, h, w in CONFIGS:
            row = floor(c, h, w, r, args.batch, args.repeats)
            m = measured.get((c, h, w, r))
            if m:
                row["filtered_ms"] = m["backward_filtered_ms"]
                row["vanilla_ms"] = m["backward_vanilla_ms"]
                row["speedup_bound"] = m["backward_vanilla_ms"] / row["floor_ms"]
                row["speedup_bound_cold"] = m["backward_vanilla_ms"] / row["floor_cold_ms"]
            rows.append(row)
            print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
