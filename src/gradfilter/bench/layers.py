"""Per-layer benchmark: the paper's seven 3×3 conv latency configs (docs/performance.md §1).

For each config and radius, the forward and the backward of one conv are timed for vanilla
PyTorch and for the filtered op, alternating in the same process; the median of the repeats is
reported with the ratio vanilla / filtered and the geometric mean of the ratios. Each config runs
in a fresh worker process so that one config's heap and cache state does not leak into the next.
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import functional as GF
from ..machine import describe, machine_info, synchronize
from . import save_result

# (channels in = out, height, width) — the paper's latency configs.
CONFIGS: list[tuple[int, int, int]] = [
    (128, 120, 160), (256, 60, 80), (512, 30, 40), (512, 14, 14),
    (256, 14, 14), (128, 28, 28), (64, 56, 56),
]
# Backward speedup of the paper's reference op on this project's 2-core CPU (docs/performance.md
# §1).
REFERENCE_CPU = {
    2: [6.2, 7.5, 13.0, 6.8, 5.3, 4.4, 2.9],
    4: [13.3, 11.9, 31.2, 9.0, 5.3, 7.2, 5.1],
}


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def bench_config(c: int, h: int, w: int, radius: int, batch: int, repeats: int,
                 device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(c, c, 3, 3, generator=gen) / math.sqrt(9 * c)).to(device)
    weight.requires_grad_()
    gy = torch.randn(batch, c, h, w, generator=gen).to(device)

    def fwd_vanilla():
        return F.conv2d(x, weight, None, 1, 1)

    def fwd_filtered():
        return GF.conv2d(x, weight, None, 1, 1, radius=radius)

    times: dict[str, list[float]] = {k: [] for k in ("fwd_v", "fwd_f", "bwd_v", "bwd_f")}
    for i in range(repeats + 2):  # two warm-up rounds are dropped
        order = [("v", fwd_vanilla), ("f", fwd_filtered)]
        if i % 2:
            order.reverse()
        for tag, fwd in order:
            synchronize(device)
            t0 = time.perf_counter()
            y = fwd()
            synchronize(device)
            t1 = time.perf_counter()
            torch.autograd.grad(y, (x, weight), gy)
            synchronize(device)
            t2 = time.perf_counter()
            del y
            if i >= 2:
                times[f"fwd_{tag}"].append(t1 - t0)
                times[f"bwd_{tag}"].append(t2 - t1)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "channels": c, "height": h, "width": w, "radius": radius, "batch": batch,
        "forward_vanilla_ms": med["fwd_v"], "forward_filtered_ms": med["fwd_f"],
        "backward_vanilla_ms": med["bwd_v"], "backward_filtered_ms": med["bwd_f"],
        "backward_speedup": med["bwd_v"] / med["bwd_f"],
        "forward_ratio": med["fwd_v"] / med["fwd_f"],
    }


def _bench_in_worker(c, h, w, r, batch, repeats, device, threads):
    torch.set_num_threads(threads)
    return bench_config(c, h, w, r, batch, repeats, torch.device(device))


def run_layers(radii=(2, 4), batch: int | None = None, repeats: int = 7, device: str = "cpu",
               out: str | None = None, quiet: bool = False) -> int:
    dev = torch.device(device)
    batch = batch or (32 if dev.type == "cuda" else 8)
    info = machine_info(device)
    rows = []
    ctx = multiprocessing.get_context("spawn")
    for r in radii:
        for c, h, w in CONFIGS:
            with ctx.Pool(1) as pool:
                row = pool.apply(_bench_in_worker, (c, h, w, r, batch, repeats, device,
                                                    torch.get_num_threads()))
            ref = REFERENCE_CPU.get(r)
            if ref is not None and dev.type == "cpu":
                row["reference_speedup"] = ref[CONFIGS.index((c, h, w))]
            rows.append(row)
            if not quiet:
                print(_row_line(row), flush=True)
    summary = {
        str(r): _geomean([x["backward_speedup"] for x in rows if x["radius"] == r]) for r in radii
    }
    result = {"machine": info, "batch": batch, "repeats": repeats, "rows": rows,
              "geomean_backward_speedup": summary}
    print(f"\nmachine: {describe(info)}; batch {batch}, median of {repeats}")
    for r, g in summary.items():
        ref = REFERENCE_CPU.get(int(r))
        ref_txt = f" (reference code: {_geomean(ref):.1f}x)" if ref and dev.type == "cpu" else ""
        print(f"geomean backward speedup r={r}: {g:.1f}x{ref_txt}")
    if out:
        path = save_result(result, out, _plot)
        print(f"wrote {path} and its plot")
    return 0


def _row_line(row: dict) -> str:
    ref = f"  ref {row['reference_speedup']:.1f}x" if "reference_speedup" in row else ""
    return (f"C={row['channels']:4d} {row['height']:3d}x{row['width']:<3d} r={row['radius']}  "
            f"bwd vanilla {row['backward_vanilla_ms']:8.2f} ms  filtered "
            f"{row['backward_filtered_ms']:7.2f} ms  speedup {row['backward_speedup']:6.1f}x{ref}"
            f"  | fwd {row['forward_vanilla_ms']:.2f} / {row['forward_filtered_ms']:.2f} ms")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radii = sorted({r["radius"] for r in result["rows"]})
    labels = [f"{c}\n{h}x{w}" for c, h, w in CONFIGS]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / (2 * len(radii))
    for i, r in enumerate(radii):
        rows = [x for x in result["rows"] if x["radius"] == r]
        xs = [j + (2 * i) * width for j in range(len(rows))]
        ax.bar(xs, [x["backward_speedup"] for x in rows], width, label=f"gradfilter r={r}")
        if all("reference_speedup" in x for x in rows):
            ax.bar([x + width for x in xs], [x["reference_speedup"] for x in rows], width,
                   label=f"reference code r={r}", alpha=0.5)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels)
    ax.set_yscale("log")
    ax.set_ylabel("backward speedup over vanilla (x)")
    ax.set_title(f"3x3 conv backward, batch {result['batch']} — {describe(result['machine'])}",
                 fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
