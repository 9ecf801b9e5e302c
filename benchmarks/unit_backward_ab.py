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

import sys
from pathlib import Path
from unittest import mock

from gradfilter import blocks, native
from gradfilter.bench.machine import describe, machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ab import FUSED_CASES, fused_flag_steps, parse_args, phase_medians, save  # noqa: E402


def _case(model: str, last: int, repeats: int) -> dict:
    with mock.patch.object(blocks, "ONE_CALL_NATIVE", False):
        times = fused_flag_steps(model, last, repeats, blocks.native, "unit_backward",
                                 native=native.unit_backward, pytorch=blocks._unit_backward)
    ms = phase_medians(times)
    return {"model": model, "last": last, "backward_ms_native": ms["backward_ms_native"],
            "backward_ms_pytorch": ms["backward_ms_pytorch"]}


def main() -> int:
    args = parse_args(__doc__)
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
