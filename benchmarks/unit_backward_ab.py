"""Fused blocks' backward with the one-pass native unit backward vs its PyTorch-ops form.

One fused model per case (as ``gradfilter bench step`` builds it: last N blocks trained, r=4,
batch 16, 224²); its training steps alternate between ``native.unit_backward`` and the PyTorch
form (``blocks._unit_backward``, swapped in for it), median backward time of repeated steps.
The blocks run their Python unit loop (``blocks.ONE_CALL_NATIVE = False``), where the unit
backward is a separate call (the one-call native backward has it inside).

    .venv/bin/python benchmarks/unit_backward_ab.py \
        --out benchmarks/results/unit_backward_ab_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch.nn.functional as F

from gradfilter import blocks, native
from gradfilter.allocator import tune_cpu_allocator
from gradfilter.bench.machine import describe, machine_info
from gradfilter.bench.step import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import FUSED_CASES, save, step_batch  # noqa: E402


def _case(model: str, last: int, repeats: int) -> dict:
    x, y = step_batch()
    net, opt, _ = build(model, "fused", last, 4, x[:2])
    net.train()
    forms = {"native": native.unit_backward, "pytorch": blocks._unit_backward}
    times: dict[str, list[float]] = {k: [] for k in forms}
    blocks.ONE_CALL_NATIVE = False
    try:
        for i in range(repeats + 3):  # three warm-up rounds are dropped
            for k in (list(forms) if i % 2 == 0 else list(reversed(forms))):
                blocks.native.unit_backward = forms[k]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(x), y)
                t0 = time.perf_counter()
                loss.backward()
                if i >= 3:
                    times[k].append(time.perf_counter() - t0)
                opt.step()
    finally:
        blocks.native.unit_backward = forms["native"]
        blocks.ONE_CALL_NATIVE = True
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"model": model, "last": last, "backward_ms_native": ms["native"],
            "backward_ms_pytorch": ms["pytorch"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tune_cpu_allocator()
    print(describe(machine_info()))
    rows = []
    with native.use_native(True):
        for model, last in FUSED_CASES:
            row = _case(model, last, args.repeats)
            rows.append(row)
            print(f"{model:22s} last {last}: backward {row['backward_ms_pytorch']:.2f} ms "
                  f"(PyTorch ops) -> {row['backward_ms_native']:.2f} ms (native)")
    save(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
