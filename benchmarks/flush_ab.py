"""Optimizer steps with and without evicting the parameters from the caches first
(``gradfilter.optim.FlushBeforeStep`` forced to ``always`` / ``never``), vanilla and fused, in
fresh worker processes one after another (each samples the VM's placement state,
``bench.machine.cross_core_read_ratio``).

Each worker builds the case's vanilla and fused models as ``gradfilter bench step`` does (r=4,
batch 16, 224²) and runs rounds of a vanilla step then a fused step, each optimizer flushing
its parameters in every other round (order flipped each round). Per worker: the read ratio
before and after, the medians of each method's optimizer step (the flush included) in both
forms, and the choice ``auto`` made in a second pass of probing (rounds alternating the two
methods likewise).

    .venv/bin/python benchmarks/flush_ab.py --workers 8 --out benchmarks/results/flush_ab_cpu.json
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import in_fresh_process, parse_args, save, step_batch, vanilla_and_fused  # noqa: E402


def _set(flush, on: bool) -> None:
    flush.mode, flush.flushing = ("always", True) if on else ("never", False)


def _worker(model: str, last: int, repeats: int) -> dict:
    from gradfilter.bench.machine import cross_core_read_ratio
    from gradfilter.bench.step import FLUSH, _timed_step
    from gradfilter.optim import FlushBeforeStep

    x, y = step_batch()
    dev = torch.device("cpu")
    pairs = dict(zip(("vanilla", "fused"), vanilla_and_fused(model, last, x)))
    before = cross_core_read_ratio()
    times: dict[str, list[float]] = {f"{m}_{f}": [] for m in pairs for f in ("never", "always")}
    for i in range(2 * repeats + 2):  # two warm-up rounds are dropped
        on = (i % 2 == 0) != (i // 2 % 2 == 0)  # flush, no flush, no flush, flush, ...
        for m, (net, opt) in pairs.items():
            _set(FLUSH[opt], on)
            t = _timed_step(net, opt, x, y, dev)[2]
            if i >= 2:
                times[f"{m}_{'always' if on else 'never'}"].append(t)
    probes = {}
    for m, (_, opt) in pairs.items():  # what auto chooses, its probes alternating as above
        FLUSH[opt].remove()
        probes[m] = FlushBeforeStep(opt)
    for _ in range(max(p.settle_steps for p in probes.values())):
        for net, opt in pairs.values():
            _timed_step(net, opt, x, y, dev)
    auto = {m: p.flushing for m, p in probes.items()}
    out = {"model": model, "last": last,
           "cross_core_read_ratio": [round(before, 2), round(cross_core_read_ratio(), 2)],
           "auto_flushes": auto}
    for k, v in times.items():
        out[f"optimizer_ms_{k}"] = round(statistics.median(v) * 1e3, 2)
    return out


def main() -> int:
    args = parse_args(__doc__, (("--workers",), {"type": int, "default": 8}),
                      (("--model",), {"default": "mobilenet_v2"}),
                      (("--last",), {"type": int, "default": 4}))
    rows = []
    for _ in range(args.workers):
        r = in_fresh_process(_worker, args.model, args.last, args.repeats)
        rows.append(r)
        print(f"{r['model']} last {r['last']}: cross-core reads "
              f"{max(r['cross_core_read_ratio']):.1f}x | optimizer step without -> with flush: "
              f"vanilla {r['optimizer_ms_vanilla_never']:.2f} -> "
              f"{r['optimizer_ms_vanilla_always']:.2f} ms, fused "
              f"{r['optimizer_ms_fused_never']:.2f} -> {r['optimizer_ms_fused_always']:.2f} ms | "
              f"auto flushes: {', '.join(m for m, on in r['auto_flushes'].items() if on) or '-'}",
              flush=True)
    save(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
