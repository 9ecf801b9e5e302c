"""A/B one private on/off switch of gradfilter inside a real training step, in one process.

Builds one model as `gradfilter bench step` does and alternates the switch between consecutive
steps (order reversible), so that both settings see the same machine state; prints the median
forward and backward time of each. This is how the CPU dispatch thresholds were chosen: kernels that
win alone can lose inside a step (cache state, thread hand-offs).

    .venv/bin/python benchmarks/ab_switch.py resnet18 4 --method lean \
        --switch gradfilter.functional:_CPU_ONEDNN
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
import torch.nn.functional as F

from gradfilter.allocator import tune_cpu_allocator
from gradfilter.bench.step import METHODS, build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("last", type=int)
    ap.add_argument("--method", choices=METHODS, default="lean")
    ap.add_argument("--switch", default="gradfilter.functional:_CPU_ONEDNN",
                    help="module:attribute, a bool toggled between steps")
    ap.add_argument("--radius", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--reverse", action="store_true", help="run False before True")
    ap.add_argument("--channels-last", action="store_true",
                    help="model and batch in channels-last memory format")
    args = ap.parse_args()
    tune_cpu_allocator()
    module_name, attr = args.switch.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, attr)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, generator=gen)
    y = torch.randint(0, 1000, (args.batch,), generator=gen)
    net, opt = build(args.model, args.method, args.last, args.radius, x[:2])[:2]
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net.train()
    order = (False, True) if args.reverse else (True, False)
    times: dict[bool, list[float]] = {True: [], False: []}
    fwd: dict[bool, list[float]] = {True: [], False: []}
    try:
        for i in range(args.repeats + 4):
            for value in order:
                setattr(module, attr, value)
                opt.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss = F.cross_entropy(net(x), y)
                t = time.perf_counter()
                loss.backward()
                if i >= 4:
                    times[value].append((time.perf_counter() - t) * 1e3)
                    fwd[value].append((t - t0) * 1e3)
    finally:
        setattr(module, attr, original)
    for value in (True, False):
        print(f"{attr}={value}: forward median {statistics.median(fwd[value]):.2f} ms, backward "
              f"median {statistics.median(times[value]):.2f} ms ({args.model}, last {args.last}, "
              f"{args.method})")


if __name__ == "__main__":
    main()
