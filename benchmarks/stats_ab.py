"""The fused blocks' stats pass against PyTorch's eval BatchNorm + ReLU6, and against the pass of
an earlier commit, on the units of MobileNetV2's and EfficientNet-Lite0's last 8 blocks (and two
wider maps of earlier blocks).

Every candidate runs in one process, alternating (order flipped each round), median of repeats:

* ``torch``   ``F.batch_norm`` (eval) then ``F.relu6`` — what a vanilla forward runs per unit;
* ``stats``   ``gradfilter.native.bn_act_stats`` of this tree (y, and per patch the mask count as
  bytes, the masked sum of z and the sum of y);
* ``sums``    the same pass writing no y (``store=False``: a pooled block's last unit);
* ``base``    with ``--baseline REV``: the same pass built from ``REV``'s ``kernels.cpp`` (under
  another op namespace), with byte counts (converted to bytes after the pass, as the fused
  forward did, where that commit's pass has no ``count_u8``).

    .venv/bin/python benchmarks/stats_ab.py --baseline 8e2760e \
        --out benchmarks/results/stats_ab_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gradfilter import functional as GF
from gradfilter import native
from gradfilter.allocator import tune_cpu_allocator
from gradfilter.bench.machine import describe, machine_info

ROOT = Path(__file__).resolve().parents[1]
# (N, C, H=W, activation upper bound or NaN): the fused units at 224², batch 16, r=4
SHAPES = [
    (16, 576, 14, 6.0), (16, 96, 14, math.nan), (16, 960, 7, 6.0), (16, 160, 7, math.nan),
    (16, 672, 14, 6.0), (16, 112, 14, math.nan), (16, 1152, 7, 6.0), (16, 192, 7, math.nan),
    (16, 1280, 7, 6.0),
    # wider maps (earlier blocks, larger images): Lite0's 28×28 stage, MobileNetV2's 56×56 one
    (16, 240, 28, 6.0), (16, 144, 56, 6.0),
]
RADIUS = 4


def _baseline_ops(rev: str):
    """The bn_act_stats op built from ``rev``'s kernels.cpp under the namespace gfbase."""
    from torch.utils.cpp_extension import load

    src = subprocess.run(["git", "show", f"{rev}:src/gradfilter/_native/kernels.cpp"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    src = src.replace("TORCH_LIBRARY(gradfilter,", "TORCH_LIBRARY(gfbase,")
    src = src.replace("TORCH_LIBRARY_IMPL(gradfilter,", "TORCH_LIBRARY_IMPL(gfbase,")
    src = src.replace("torch.classes.gradfilter.", "torch.classes.gfbase.")  # the plan class
    path = Path(tempfile.mkdtemp()) / "kernels_base.cpp"
    path.write_text(src)
    load(name=f"gradfilter_stats_base_{rev}", sources=[str(path)],
         extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False)
    return torch.ops.gfbase.bn_act_stats


def _case(n: int, c: int, hw: int, upper: float, repeats: int, base) -> dict:
    gen = torch.Generator().manual_seed(c + hw)
    z = torch.randn(n, c, hw, hw, generator=gen) * 2 + 1
    scale, shift = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.1
    mean, var = torch.zeros(c), torch.ones(c)
    grid = GF.axis_geometry(hw, hw, 1, 1, 1, RADIUS)  # a fused unit's stride-1 patch grid
    p, pad = grid.patches, grid.out_pad

    def torch_unit():
        y = F.batch_norm(z, mean, var, scale, shift, False, 0.0, 0.0)
        return y if math.isnan(upper) else F.relu6(y)

    fns = {"torch": torch_unit,
           "stats": lambda: native.bn_act_stats(z, scale, shift, upper, RADIUS, pad, pad, p, p,
                                                True),
           "sums": lambda: native.bn_act_stats(z, scale, shift, upper, RADIUS, pad, pad, p, p,
                                               True, store=False)}
    if base is not None:
        byte_counts = any(a.name == "count_u8" for a in base.default._schema.arguments)

        def base_unit():
            if byte_counts:
                return base(z, scale, shift, upper, RADIUS, pad, pad, p, p, True)[1]
            out = base(z, scale, shift, upper, RADIUS, pad, pad, p, p)
            return out[1].to(torch.uint8)

        fns["base"] = base_unit
    for f in fns.values():
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        for k in (list(fns) if i % 2 == 0 else list(reversed(fns))):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    ms = {k: round(statistics.median(v) * 1e3, 4) for k, v in times.items()}
    return {"shape": [n, c, hw, hw], "activation": "none" if math.isnan(upper) else "relu6",
            **{f"{k}_ms": v for k, v in ms.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", help="git revision whose stats pass to compare against")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tune_cpu_allocator()
    with native.use_native(True):
        base = _baseline_ops(args.baseline) if args.baseline else None
        rows = [_case(*s, args.repeats, base) for s in SHAPES]
    print(describe(machine_info()))
    for r in rows:
        line = f"{str(tuple(r['shape'])):20s} {r['activation']:5s} torch {r['torch_ms']:.3f} ms" \
               f" | stats {r['stats_ms']:.3f} ms ({r['stats_ms'] / r['torch_ms']:.2f}x torch)" \
               f" | no y {r['sums_ms']:.3f} ms"
        if "base_ms" in r:
            line += f" | base {r['base_ms']:.3f} ms ({r['base_ms'] / r['stats_ms']:.2f}x stats)"
        print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine_info(), "radius": RADIUS,
                                        "baseline": args.baseline, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
