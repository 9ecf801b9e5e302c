"""The fused backward's weight-gradient and g̃x products cut by output rows into one run per
thread (``blocks.SPLIT_ROWS``, kernels.cpp ``mm_rows``) against one multi-threaded product each
(the form before).

Each case runs in ``--workers`` fresh processes, one after another: whether the VM's two vCPUs
share a cache is a state that holds for minutes (``cross_core_read_ratio`` in
gradfilter/bench/machine.py, about 1 when they do and 2 when they do not), so several processes
sample it. In each: the vanilla and the fused model as ``gradfilter bench step`` builds them
(last N blocks, r=4, batch 16, 224²); every round a vanilla step (the benchmark runs the other
methods between fused steps), then a fused step in each form, the order flipped each round;
per form the medians of the fused backward and optimizer step, and the read ratio before and
after the rounds.

    .venv/bin/python benchmarks/rows_ab.py --out benchmarks/results/rows_ab_cpu.json
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import (  # noqa: E402
    FUSED_CASES,
    flag_forms,
    in_fresh_process,
    parse_args,
    save,
    step_batch,
    vanilla_and_fused,
)


def _worker(model: str, last: int, repeats: int) -> dict:
    from gradfilter import blocks
    from gradfilter.bench.machine import cross_core_read_ratio
    from gradfilter.bench.step import _timed_step

    x, y = step_batch()
    dev = torch.device("cpu")
    vanilla, fused = vanilla_and_fused(model, last, x)
    before = cross_core_read_ratio()
    with flag_forms(blocks, "SPLIT_ROWS", rows=True, one_mm=False) as forms:
        times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in forms}
        for i in range(repeats + 2):  # two warm-up rounds are dropped
            for form in (list(forms) if i % 2 == 0 else list(reversed(forms))):
                _timed_step(*vanilla, x, y, dev)
                forms[form]()
                parts = _timed_step(*fused, x, y, dev)
                if i >= 2:
                    times[form].append(parts)
    row = {"model": model, "last": last,
           "cross_core_read_ratio": [round(before, 2), round(cross_core_read_ratio(), 2)]}
    for form, parts in times.items():
        row[f"backward_ms_{form}"] = round(statistics.median(p[1] for p in parts) * 1e3, 2)
        row[f"optimizer_ms_{form}"] = round(statistics.median(p[2] for p in parts) * 1e3, 2)
    return row


def main() -> int:
    args = parse_args(__doc__, (("--workers",), {"type": int, "default": 4}))
    rows = []
    for model, last in FUSED_CASES:
        for _ in range(args.workers):
            row = in_fresh_process(_worker, model, last, args.repeats)
            rows.append(row)
            ratio = max(row["cross_core_read_ratio"])
            print(f"{model:22s} last {last}: cross-core reads {ratio:.1f}x"
                  f" | backward {row['backward_ms_one_mm']:.2f} -> {row['backward_ms_rows']:.2f} ms"
                  f" | optimizer {row['optimizer_ms_one_mm']:.2f} -> {row['optimizer_ms_rows']:.2f}"
                  " ms (one product -> rows per thread)", flush=True)
    save(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
