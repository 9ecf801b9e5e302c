"""The VM state behind the fused model's slow optimizer step (docs/performance.md): in fresh
worker processes, one after another, the cross-core read ratio (``bench.machine``) and what the
fused step does in that state.

Each worker builds MobileNetV2's vanilla and fused models as ``gradfilter bench step`` does
(last 4 blocks, r=4, batch 16, 224²) and runs rounds of a vanilla step then a fused step; after
each fused step's optimizer step a second optimizer step runs on the same gradients. Per
worker: the read ratio before and after, and the medians of the fused backward, its optimizer
step, the second optimizer step and vanilla's optimizer step.

    .venv/bin/python benchmarks/split_state.py --out benchmarks/results/split_state_cpu.json
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import in_fresh_process, parse_args, save, step_batch, vanilla_and_fused  # noqa: E402


def _worker(repeats: int) -> dict:
    from gradfilter.bench.machine import cross_core_read_ratio
    from gradfilter.bench.step import FLUSH, _timed_step

    x, y = step_batch()
    dev = torch.device("cpu")
    vanilla, fused = vanilla_and_fused("mobilenet_v2", 4, x)
    for _, opt in (vanilla, fused):  # the state as it is: no parameter flush (flush_ab.py)
        FLUSH[opt].remove()
    before = cross_core_read_ratio()
    rows: dict[str, list[float]] = {"backward": [], "optimizer": [], "second": [], "vanilla": []}
    for i in range(repeats + 2):  # two warm-up rounds are dropped
        v = _timed_step(*vanilla, x, y, dev)
        f = _timed_step(*fused, x, y, dev)
        t0 = time.perf_counter()
        fused[1].step()  # the same gradients again
        second = time.perf_counter() - t0
        if i >= 2:
            for k, t in (("backward", f[1]), ("optimizer", f[2]), ("second", second),
                         ("vanilla", v[2])):
                rows[k].append(t)
    out = {"cross_core_read_ratio": [round(before, 2), round(cross_core_read_ratio(), 2)]}
    names = {"backward": "fused_backward_ms", "optimizer": "fused_optimizer_ms",
             "second": "fused_second_optimizer_ms", "vanilla": "vanilla_optimizer_ms"}
    for k, name in names.items():
        out[name] = round(statistics.median(rows[k]) * 1e3, 2)
    return out


def main() -> int:
    args = parse_args(__doc__, (("--workers",), {"type": int, "default": 8}))
    if torch.get_num_threads() < 2:
        print("split_state: needs at least two threads")
        return 1
    rows = []
    for _ in range(args.workers):
        row = in_fresh_process(_worker, args.repeats)
        rows.append(row)
        print(f"cross-core reads {max(row['cross_core_read_ratio']):.1f}x | fused backward "
              f"{row['fused_backward_ms']:.2f} ms, optimizer {row['fused_optimizer_ms']:.2f} ms,"
              f" again right after {row['fused_second_optimizer_ms']:.2f} ms | vanilla optimizer "
              f"{row['vanilla_optimizer_ms']:.2f} ms", flush=True)
    save(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
