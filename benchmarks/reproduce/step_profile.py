"""Where one training step's time goes: forward / backward / optimizer per method, and a
``torch.profiler`` table of one step for chosen methods (the ops behind docs/performance.md's
end-to-end analysis).

    .venv/bin/python benchmarks/reproduce/step_profile.py mobilenet_v2 4 --profile lean
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from gradfilter.allocator import tune_cpu_allocator
from gradfilter.bench.step import METHODS, _timed_step, build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("last", type=int)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--profile", default="", help="comma-separated methods to profile")
    ap.add_argument("--radius", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--allocator", choices=["tuned", "default"], default="tuned")
    args = ap.parse_args()
    if args.allocator == "tuned":
        tune_cpu_allocator()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, generator=gen)
    y = torch.randint(0, 1000, (args.batch,), generator=gen)
    nets = {m: build(args.model, m, args.last, args.radius, x[:2])[:2]
            for m in args.methods.split(",")}
    times: dict[str, list[tuple[float, float, float]]] = {m: [] for m in nets}
    for i in range(args.repeats + 2):
        for m, (net, opt) in nets.items():  # alternate the methods
            net.train()
            parts = _timed_step(net, opt, x, y, torch.device("cpu"))
            if i >= 2:
                times[m].append(parts)
    for m, rows in times.items():
        fwd, bwd, step = (statistics.median(r[k] for r in rows) * 1e3 for k in range(3))
        print(f"{m:9s} forward {fwd:7.1f} ms  backward {bwd:6.1f} ms  optimizer {step:5.1f} ms")
    for m in filter(None, args.profile.split(",")):
        net, _ = nets[m]
        with torch.profiler.profile() as prof:
            F.cross_entropy(net(x), y).backward()
        print(f"\n{m}: one step, ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
