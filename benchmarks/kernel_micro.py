"""Micro-benchmarks behind the CPU implementation choices of docs/performance.md.

Each row times one full-resolution pass (or patch-resolution product) of the filtered backward
or the lean activations on the shapes where the choice matters, every candidate in the same
process, alternating, median of repeats:

* patch sums / unpooling: the native kernel (gradfilter.native), the pure-PyTorch path, and the
  tiny-map GEMM, against a plain ``clone`` of the same tensor (the memory-traffic floor);
* patch products: MKL GEMMs on channel-major copies vs oneDNN's 1×1 conv backward (on plain and
  on channels-last maps);
* lean ReLU6: native one-pass clamp + bit mask and mask application vs PyTorch's relu6 and
  hardtanh backward (which keep the full map).

The allocator's effect is measured by running one filtered and one vanilla conv backward in two
fresh processes, one with the tuned allocator and one without.

    .venv/bin/python benchmarks/kernel_micro.py --out benchmarks/results/kernel_micro_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gradfilter import functional as GF
from gradfilter import native
from gradfilter.allocator import tune_cpu_allocator
from gradfilter.bench.machine import describe, machine_info


def _median_ms(fns: dict, repeats: int) -> dict[str, float]:
    for f in fns.values():
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():  # alternate the candidates
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) * 1e3, 4) for k, v in times.items()}


POOL_SHAPES = [  # (N, C, H, r): the last blocks of MobileNetV2/ResNet18 at 224², paper configs
    (16, 960, 7, 4), (16, 256, 14, 4), (16, 512, 14, 2), (8, 64, 56, 4), (8, 128, 120, 4),
]


def pool_rows(repeats: int) -> list[dict]:
    return [_pool_case(n, c, h, r, repeats) for n, c, h, r in POOL_SHAPES]


def _pool_case(n: int, c: int, h: int, r: int, repeats: int) -> dict:
    w = h if h != 120 else 160
    gh, gw = (GF.axis_geometry(s, s, 3, 1, 1, r) for s in (h, w))
    x = torch.randn(n, c, h, w)
    g = torch.randn(n, c, gh.patches, gw.patches)
    args = (r, r, gh.out_pad, gw.out_pad, gh.patches, gw.patches)
    tiles = gh.out_pad == 0 and gw.out_pad == 0 and h % r == 0 and w % r == 0

    def torch_pool():  # the strided PyTorch-ops path
        with native.use_native(False):
            return GF._sum_exact(x, r, r) if tiles else GF._padded_patch_sums(x, gh, gw)

    def torch_unpool():  # the PyTorch-ops path
        return GF._unpool_pytorch(g, gh, gw)

    fns = {
        "pool_native": lambda: native.patch_sum(x, *args),
        "pool_pytorch": torch_pool,
        "unpool_native": lambda: native.unpool(g, h, w, r, r, gh.out_pad, gw.out_pad),
        "unpool_pytorch": torch_unpool,
        "clone_floor": lambda: x.clone(),
    }
    if GF._tiny(h * w, gh.patches * gw.patches):
        k = GF._pool_matrix(h, w, r, r, gh.out_pad, gw.out_pad, gh.patches, gw.patches,
                            x.dtype)
        flat, gflat = x.reshape(n * c, h * w), g.reshape(n * c, -1)
        fns["pool_tiny_gemm"] = lambda: torch.mm(k.t(), flat.t())
        fns["unpool_tiny_gemm"] = lambda: torch.mm(gflat, k.t())
    return {"shape": [n, c, h, w], "radius": r, "ms": _median_ms(fns, repeats)}


# end-to-end shapes (batch 16, r=4 on 7×7 maps) and the per-layer benchmark's (batch 8)
PRODUCT_SHAPES = [(16, 960, 160, 2, 2), (16, 512, 512, 2, 2), (8, 512, 512, 7, 7),
                  (8, 256, 256, 7, 7), (8, 128, 128, 7, 7), (8, 64, 64, 28, 28),
                  (8, 512, 512, 15, 20), (8, 256, 256, 30, 40), (8, 128, 128, 60, 80)]


def product_rows(repeats: int) -> list[dict]:
    return [_product_case(*shape, repeats) for shape in PRODUCT_SHAPES]


def _product_case(n: int, co: int, ci: int, ph: int, pw: int, repeats: int) -> dict:
    g, x, w = torch.randn(n, co, ph, pw), torch.randn(n, ci, ph, pw), torch.randn(co, ci, 1, 1)
    p = ph * pw

    def mkl():
        gt = g.transpose(0, 1).reshape(co, n * p)
        xt = x.transpose(0, 1).reshape(ci, n * p)
        return torch.mm(gt, xt.t()), torch.mm(w.view(co, ci).t(), gt)

    def onednn(g=g, x=x, w=w):
        return torch.ops.aten.convolution_backward(
            g, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])

    cl = torch.channels_last
    g_cl, x_cl, w_cl = (t.contiguous(memory_format=cl) for t in (g, x, w))
    return {"n": n, "cout": co, "cin": ci, "patches": [ph, pw], "macs": n * p * co * ci,
            "ms": _median_ms({"mkl_gemm": mkl, "onednn_1x1_backward": onednn,
                              "onednn_1x1_backward_nhwc": lambda: onednn(g_cl, x_cl, w_cl)},
                             repeats)}


def activation_rows(repeats: int) -> list[dict]:
    x = torch.randn(16, 960, 7, 7) * 4
    g = torch.randn_like(x)
    _, bits = native.masked_clamp(x, 6.0)
    fns = {
        "native_relu6_and_mask": lambda: native.masked_clamp(x, 6.0),
        "pytorch_relu6": lambda: F.relu6(x),
        "native_mask_apply": lambda: native.mask_apply(g, bits),
        "pytorch_hardtanh_backward": lambda: torch.ops.aten.hardtanh_backward(g, x, 0.0, 6.0),
    }
    return [{"shape": list(x.shape), "ms": _median_ms(fns, repeats)}]


_ALLOC_CHILD = """
import json, sys, time, statistics, torch
if sys.argv[1] == "tuned":
    from gradfilter.allocator import tune_cpu_allocator; tune_cpu_allocator()
from gradfilter import functional as GF
x = torch.randn(8, 128, 120, 160, requires_grad=True)
w = torch.randn(128, 128, 3, 3, requires_grad=True)
gy = torch.randn(8, 128, 120, 160)
out = {}
for name, conv in (("vanilla", lambda: torch.nn.functional.conv2d(x, w, padding=1)),
                   ("filtered_r4", lambda: GF.conv2d(x, w, padding=1, radius=4))):
    ts = []
    for _ in range(int(sys.argv[2]) + 2):
        y = conv()
        t0 = time.perf_counter()
        torch.autograd.grad(y, (x, w), gy)
        ts.append(time.perf_counter() - t0)
    out[name] = round(statistics.median(ts[2:]) * 1e3, 2)
print(json.dumps(out))
"""


def allocator_rows(repeats: int) -> list[dict]:
    rows = []
    for mode in ("default", "tuned"):
        env_free = {k: v for k, v in __import__("os").environ.items()
                    if not k.startswith("MALLOC_")}
        res = subprocess.run([sys.executable, "-c", _ALLOC_CHILD, mode, str(repeats)],
                             capture_output=True, text=True, env=env_free, check=True)
        rows.append({"allocator": mode, "config": "128x120x160, batch 8, 3x3",
                     "backward_ms": json.loads(res.stdout.strip().splitlines()[-1])})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    allocator = allocator_rows(max(5, args.repeats // 3))  # fresh processes, before tuning here
    tune_cpu_allocator()
    if not native.available():
        raise SystemExit("the native kernels are needed for this benchmark (GRADFILTER_NATIVE)")
    result = {"machine": machine_info("cpu"), "repeats": args.repeats,
              "allocator": allocator, "pooling": pool_rows(args.repeats),
              "products": product_rows(args.repeats),
              "activations": activation_rows(args.repeats)}
    print(f"machine: {describe(result['machine'])}")
    for row in allocator:
        print(f"allocator {row['allocator']:8s} backward ms {row['backward_ms']}")
    for key in ("pooling", "products", "activations"):
        for row in result[key]:
            label = {k: v for k, v in row.items() if k != "ms"}
            print(key, label, row["ms"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
